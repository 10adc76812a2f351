//! Visit batching (`upstream.batch_max` above 1), end to end: one POST
//! carries the visits that waited for it, every visitor in it is answered
//! from its one outcome by the counting rules, and the count stays exact:
//! under 64+ keep-alive clients, under an upstream that accepts, refuses,
//! resets after reading or never answers, and across a counter restarted
//! mid-load. A visit that finds room in flight goes at once, alone, as
//! the unbatched request.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::{
    Backend, Behaviour, Client, GatewayConfig, Process, TestUpstream, Threading, counter_tally,
    scrape, start_counter, visits_in,
};
use http::StatusCode;
use tokio::io::AsyncWriteExt;
use tokio::task::JoinSet;

const BATCH: &str = "batch_max = 64";

/// Sends `clients` visits at once, one per connection; their statuses.
async fn visit_at_once(addr: SocketAddr, clients: usize) -> Vec<StatusCode> {
    let mut visits = JoinSet::new();
    for _ in 0..clients {
        visits.spawn(async move { common::get(addr, "/").await.status });
    }
    let mut statuses = Vec::new();
    while let Some(status) = visits.join_next().await {
        statuses.push(status.expect("visit task"));
    }
    statuses
}

fn how_many(statuses: &[StatusCode], status: StatusCode) -> u64 {
    statuses.iter().filter(|&&s| s == status).count() as u64
}

async fn batching_counts_exactly_under_many_keep_alive_clients(backend: Backend) {
    const CLIENTS: u64 = 96;
    const VISITS: u64 = 30;
    let counter = start_counter(backend);
    let gateway = GatewayConfig::new(backend, counter.addr("counter"))
        .upstream(BATCH)
        .with_admin()
        .start();
    let public = gateway.addr("public");
    let mut clients = JoinSet::new();
    for _ in 0..CLIENTS {
        clients.spawn(async move {
            let mut client = Client::connect(public).await;
            for _ in 0..VISITS {
                assert_eq!(client.get("/").await.status, StatusCode::OK);
            }
        });
    }
    while let Some(client) = clients.join_next().await {
        client.expect("client task");
    }
    assert_eq!(
        counter_tally(counter.addr("counter")).await,
        CLIENTS * VISITS
    );
    let metrics = scrape(gateway.addr("admin")).await;
    let visits = metrics["gateway_upstream_visits_total{outcome=\"ok\"}"];
    let posts = metrics["gateway_upstream_requests_total{outcome=\"ok\"}"];
    eprintln!("{}: {visits} visits in {posts} POSTs", backend.name());
    assert_eq!(visits as u64, CLIENTS * VISITS);
    assert!(posts < visits, "{visits} visits in {posts} POSTs: no batch");
}

async fn batching_counts_exactly_with_shared_threading(backend: Backend) {
    let counter = start_counter(backend);
    let gateway = GatewayConfig::new(backend, counter.addr("counter"))
        .upstream(BATCH)
        .threading(Threading::Shared)
        .start();
    common::visit_concurrently(gateway.addr("public"), 64, 20).await;
    assert_eq!(counter_tally(counter.addr("counter")).await, 64 * 20);
}

/// 64 visitors at once against an upstream that takes its time, so that
/// most of them wait in batches: every one is answered by the rule for
/// what the upstream did, checked against the upstream's own tally.
async fn every_visit_in_a_batch_gets_the_batch_outcome(backend: Backend) {
    const VISITORS: usize = 64;
    let slow = Duration::from_millis(250);
    for behaviour in [
        Behaviour::Slow(slow, 200),
        Behaviour::Slow(slow, 503),
        Behaviour::ResetAfterRead(slow),
        Behaviour::Hang,
    ] {
        let upstream = TestUpstream::start(behaviour).await;
        let gateway = GatewayConfig::new(backend, upstream.addr)
            .upstream(BATCH)
            .upstream("request_timeout_ms = 1500")
            .start();
        let statuses = visit_at_once(gateway.addr("public"), VISITORS).await;
        let ok = how_many(&statuses, StatusCode::OK);
        let failed = how_many(&statuses, StatusCode::BAD_GATEWAY);
        let timed_out = how_many(&statuses, StatusCode::GATEWAY_TIMEOUT);
        let unsent = how_many(&statuses, StatusCode::SERVICE_UNAVAILABLE);
        let (received, accepted) = (upstream.received_visits(), upstream.accepted_visits());
        eprintln!(
            "{} {behaviour:?}: {ok} 200, {failed} 502, {timed_out} 504, {unsent} 503; \
             the upstream received {received} visits in {} POSTs, largest {}, accepted {accepted}",
            backend.name(),
            upstream.posts(),
            upstream.largest_batch(),
        );
        assert!(received <= VISITORS as u64, "a visit was sent twice");
        match behaviour {
            Behaviour::Slow(_, 200) => {
                assert_eq!(ok, VISITORS as u64, "{statuses:?}");
                assert_eq!(accepted, ok);
            }
            Behaviour::Slow(..) => {
                assert_eq!(failed, VISITORS as u64, "{statuses:?}");
                assert_eq!(accepted, 0);
            }
            Behaviour::ResetAfterRead(_) => {
                // Every visit was sent once; none can be known counted.
                assert_eq!(failed, VISITORS as u64, "{statuses:?}");
                assert_eq!(received, VISITORS as u64);
            }
            _ => {
                // Sent and unanswered: 504; never sent: 503. (A 504's POST
                // may still be on its way: the upstream can have fewer.)
                assert_eq!(timed_out + unsent, VISITORS as u64, "{statuses:?}");
                assert!(received <= timed_out, "a visit answered 503 was sent");
            }
        }
        if behaviour != Behaviour::Hang {
            assert!(
                upstream.largest_batch() > 1,
                "{behaviour:?}: every POST carried one visit"
            );
        }
    }
}

/// `gateway counter` on `listen` with its state in `state`.
fn counter_on(backend: Backend, listen: SocketAddr, state: &Path) -> Process {
    let mut command = Command::new(common::gateway_binary());
    command
        .args(["counter", "--backend", backend.name(), "--listen"])
        .arg(listen.to_string())
        .arg("--path")
        .arg(state)
        .env_remove("RUST_LOG");
    Process::start_command(command, 1)
}

/// The counter is killed under batched load and started again on its
/// state: every 200 is in the count, and the count holds no more than the
/// 200s and the answers that said "may be counted" (502, 504).
async fn a_counter_restarted_mid_load_loses_no_200_and_counts_none_twice(backend: Backend) {
    const CLIENTS: usize = 64;
    let state_dir = tempfile::tempdir().unwrap();
    let state = state_dir.path().join("counter.state");
    let listen = TestUpstream::closed_port().await;
    let mut counter = counter_on(backend, listen, &state);
    let gateway = GatewayConfig::new(backend, listen).upstream(BATCH).start();
    let public = gateway.addr("public");
    let stop = Arc::new(AtomicBool::new(false));
    let answers: Arc<[AtomicU64; 4]> = Arc::new(Default::default());
    let mut clients = JoinSet::new();
    for _ in 0..CLIENTS {
        let (stop, answers) = (stop.clone(), answers.clone());
        clients.spawn(async move {
            let mut client = Client::connect(public).await;
            while !stop.load(Ordering::SeqCst) {
                let status = match client.send(common::request("GET", "/")).await {
                    Ok(answer) => answer.status,
                    Err(error) => panic!("the gateway always answers: {error}"),
                };
                let index = match status.as_u16() {
                    200 => 0,
                    502 => 1,
                    504 => 2,
                    503 => 3,
                    other => panic!("unexpected status {other}"),
                };
                answers[index].fetch_add(1, Ordering::SeqCst);
            }
        });
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    counter.child.kill().unwrap();
    counter.child.wait().unwrap();
    let answered_before = answers[0].load(Ordering::SeqCst);
    let _restarted = counter_on(backend, listen, &state);
    tokio::time::sleep(Duration::from_millis(600)).await;
    stop.store(true, Ordering::SeqCst);
    while let Some(client) = clients.join_next().await {
        client.expect("client task");
    }
    let [ok, failed, timed_out, unsent] = answers.each_ref().map(|a| a.load(Ordering::SeqCst));
    let count = counter_tally(listen).await;
    eprintln!(
        "{}: {ok} 200 ({answered_before} before the kill), {failed} 502, {timed_out} 504, \
         {unsent} 503; {count} counted",
        backend.name()
    );
    assert!(
        answered_before > 0 && ok > answered_before,
        "load on both sides of the restart"
    );
    assert!(count >= ok, "{count} counted, {ok} answered 200");
    assert!(
        count <= ok + failed + timed_out,
        "{count} counted: more than {ok} 200s, {failed} 502s and {timed_out} 504s"
    );
}

/// A one-worker gateway, batching, in front of an upstream that answers
/// after `delay`, with both of the worker's POSTs out: two visits sent
/// and not yet answered (`first`), so the next ones wait in a batch.
struct BothPostsOut {
    upstream: TestUpstream,
    _gateway: Process,
    public: SocketAddr,
    first: tokio::task::JoinHandle<Vec<StatusCode>>,
}

async fn both_posts_out(backend: Backend, delay: Duration) -> BothPostsOut {
    let upstream = TestUpstream::start(Behaviour::Delay(delay)).await;
    let gateway = GatewayConfig::new(backend, upstream.addr)
        .upstream(BATCH)
        .workers(1)
        .start();
    let public = gateway.addr("public");
    let first = tokio::spawn(visit_at_once(public, 2));
    upstream.wait_for_posts(2).await;
    BothPostsOut {
        upstream,
        _gateway: gateway,
        public,
        first,
    }
}

/// With room in flight a visit is not held for company: it goes at once,
/// as the very request it would be without batching (no body, its
/// `x-forwarded-for`). Visits that come while the worker's two POSTs are
/// out wait for one of them, then go together in one POST.
async fn a_lone_visit_goes_at_once_and_later_ones_wait_for_a_post(backend: Backend) {
    let out = both_posts_out(backend, Duration::from_millis(400)).await;
    let later = tokio::spawn(visit_at_once(out.public, 3));
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(
        out.upstream.posts(),
        2,
        "a visit went out while both POSTs were"
    );
    let mut statuses = out.first.await.unwrap();
    statuses.extend(later.await.unwrap());
    assert_eq!(statuses, [StatusCode::OK; 5]);
    let requests = out.upstream.requests();
    let bodies: Vec<_> = requests.iter().map(|seen| seen.body.clone()).collect();
    assert_eq!(
        bodies,
        [&b""[..], b"", b"3"],
        "two alone, then one of three"
    );
    for alone in &requests[..2] {
        assert_eq!(alone.headers["x-forwarded-for"], "127.0.0.1");
        assert_eq!(alone.headers["content-length"], "0");
    }
    assert_eq!(requests[2].headers["content-type"], "text/plain");
    assert!(!requests[2].headers.contains_key("x-forwarded-for"));
    assert_eq!(out.upstream.accepted_visits(), 5);
}

/// A visitor whose connection is reset while its batch waits leaves the
/// batch: the POST that goes carries only the visitors still there.
async fn a_visitor_gone_before_the_send_is_not_counted(backend: Backend) {
    let out = both_posts_out(backend, Duration::from_millis(400)).await;
    let staying = tokio::spawn(visit_at_once(out.public, 2));
    let mut leaving = tokio::net::TcpStream::connect(out.public).await.unwrap();
    leaving
        .write_all(b"GET / HTTP/1.1\r\nhost: t\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    socket2::SockRef::from(&leaving)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(leaving);
    let mut statuses = out.first.await.unwrap();
    statuses.extend(staying.await.unwrap());
    assert_eq!(statuses, [StatusCode::OK; 4]);
    let bodies: Vec<_> = out
        .upstream
        .requests()
        .iter()
        .map(|seen| visits_in(&seen.body))
        .collect();
    assert_eq!(bodies, [1, 1, 2], "the reset visitor left its batch");
    assert_eq!(out.upstream.accepted_visits(), 4);
}

/// With the pool at its cap, a batch that cannot get a connection by its
/// oldest visit's deadline is never sent: its visitors get 503 (nothing
/// counted), as an unbatched visit would, not 504.
async fn a_batch_that_never_gets_a_connection_is_a_503(backend: Backend) {
    let upstream = TestUpstream::start(Behaviour::Hang).await;
    let gateway = GatewayConfig::new(backend, upstream.addr)
        .upstream(BATCH)
        .upstream("max_connections = 1\nrequest_timeout_ms = 600")
        .workers(1)
        .start();
    let public = gateway.addr("public");
    let first = tokio::spawn(common::get(public, "/"));
    upstream.wait_for_posts(1).await;
    let mut statuses = visit_at_once(public, 6).await;
    statuses.push(first.await.unwrap().status);
    statuses.sort();
    let mut expected = vec![StatusCode::SERVICE_UNAVAILABLE; 6];
    expected.push(StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(statuses, expected, "only the POST that left is a 504");
    assert_eq!(upstream.posts(), 1);
}

/// A client that shuts down its sending side after its request (`nc -N`)
/// is still in its batch, and answered.
async fn a_half_closed_client_in_a_batch_is_answered(backend: Backend) {
    let out = both_posts_out(backend, Duration::from_millis(300)).await;
    let mut half_closed = JoinSet::new();
    for _ in 0..3 {
        half_closed.spawn(common::get_then_half_close(out.public));
    }
    while let Some(reply) = half_closed.join_next().await {
        let reply = reply.unwrap();
        assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply:?}");
    }
    assert_eq!(out.first.await.unwrap(), [StatusCode::OK; 2]);
    assert_eq!(out.upstream.accepted_visits(), 5);
    assert_eq!(out.upstream.largest_batch(), 3);
}

/// Off by default: every visit is its own POST, as without the setting.
async fn batching_is_off_by_default(backend: Backend) {
    let upstream = TestUpstream::start(Behaviour::Delay(Duration::from_millis(200))).await;
    let gateway = GatewayConfig::new(backend, upstream.addr).start();
    let statuses = visit_at_once(gateway.addr("public"), 16).await;
    assert_eq!(statuses, [StatusCode::OK; 16]);
    assert_eq!(upstream.posts(), 16);
    assert_eq!(upstream.largest_batch(), 1);
}

both_backends!(
    batching_counts_exactly_under_many_keep_alive_clients,
    batching_counts_exactly_with_shared_threading,
    every_visit_in_a_batch_gets_the_batch_outcome,
    a_counter_restarted_mid_load_loses_no_200_and_counts_none_twice,
    a_lone_visit_goes_at_once_and_later_ones_wait_for_a_post,
    a_visitor_gone_before_the_send_is_not_counted,
    a_batch_that_never_gets_a_connection_is_a_503,
    a_half_closed_client_in_a_batch_is_answered,
    batching_is_off_by_default,
);
