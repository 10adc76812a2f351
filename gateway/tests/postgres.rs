//! The built-in counter's PostgreSQL store, against a real PostgreSQL
//! server: counters in separate processes share one exact count; a
//! database restart under load loses no 200 and counts nothing twice (a
//! commit whose connection was lost is settled, or answered 504 when the
//! database stays away), and 200s come back by themselves once it is up; a counter started before
//! its database answers 503 until it is there; a database that accepts
//! connections and never answers (a silent host, a stopped postmaster)
//! holds neither the counter's start nor its visits, which are answered
//! 503 until it answers; a database that refuses
//! the counter stops its start, naming it; a connection the server closed
//! while idle (`idle_session_timeout`, `pg_terminate_backend`) costs no
//! visit; a role with no right to make tables runs the counter once they
//! exist; a count removed under a running counter refuses visits instead
//! of starting again from 0; each writer adds to a part of its own, a
//! database of one row for the count is upgraded in place, and an idle
//! writer's part is folded into the base row without moving the count. Skipped, saying so, where PostgreSQL is not
//! installed.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::netns::Network;
use common::postgres::Postgres;
use common::{Answer, Backend, Client, Process, counter_tally, request};
use http::StatusCode;

fn counter_command(backend: Backend, url: &str) -> Command {
    let mut command = common::counter_command(backend);
    command.args(["--store", "postgres", "--postgres-url", url]);
    command
}

fn start_counter(backend: Backend, url: &str) -> Process {
    Process::start_command(counter_command(backend, url), 1)
}

/// What the posting clients were answered.
#[derive(Default)]
struct Answers {
    ok: AtomicU64,
    refused: AtomicU64,
    unknown: AtomicU64,
    /// When the last 200 came, as microseconds after `since`.
    last_ok_us: AtomicU64,
}

impl Answers {
    fn ok(&self) -> u64 {
        self.ok.load(Ordering::SeqCst)
    }
}

/// Eight keep-alive clients per counter POSTing until stopped, tallying
/// what each counter answered.
struct Load {
    stop: Arc<AtomicBool>,
    since: Instant,
    answers: Vec<Arc<Answers>>,
    tasks: tokio::task::JoinSet<()>,
}

impl Load {
    fn start(counters: &[Process]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let since = Instant::now();
        let answers: Vec<Arc<Answers>> = counters.iter().map(|_| Arc::default()).collect();
        let mut tasks = tokio::task::JoinSet::new();
        for (counter, answers) in counters.iter().zip(&answers) {
            let counter = counter.addr("counter");
            for _ in 0..8 {
                let (stop, answers) = (stop.clone(), answers.clone());
                tasks.spawn(post_until(counter, stop, answers, since));
            }
        }
        Self {
            stop,
            since,
            answers,
            tasks,
        }
    }

    /// Microseconds from the start to `at`.
    fn us(&self, at: Instant) -> u64 {
        at.duration_since(self.since).as_micros() as u64
    }

    /// Stops the clients once their POSTs in flight are answered; returns
    /// the 200s, 503s and 504s of all counters.
    async fn stop(&mut self) -> (u64, u64, u64) {
        self.stop.store(true, Ordering::SeqCst);
        while let Some(result) = self.tasks.join_next().await {
            result.expect("client");
        }
        let sum = |field: fn(&Answers) -> &AtomicU64| -> u64 {
            self.answers
                .iter()
                .map(|a| field(a).load(Ordering::SeqCst))
                .sum()
        };
        (sum(|a| &a.ok), sum(|a| &a.refused), sum(|a| &a.unknown))
    }
}

/// One keep-alive client POSTing to `counter` until `stop`.
async fn post_until(
    counter: SocketAddr,
    stop: Arc<AtomicBool>,
    answers: Arc<Answers>,
    since: Instant,
) {
    let mut client = Client::connect(counter).await;
    while !stop.load(Ordering::SeqCst) {
        let answer = client
            .send(request("POST", "/counter"))
            .await
            .expect("an answer");
        match answer.status {
            StatusCode::OK => {
                answers.ok.fetch_add(1, Ordering::SeqCst);
                let at = since.elapsed().as_micros() as u64;
                answers.last_ok_us.fetch_max(at, Ordering::SeqCst);
            }
            StatusCode::SERVICE_UNAVAILABLE => {
                answers.refused.fetch_add(1, Ordering::SeqCst);
                // As the retry-after asks, a little.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            StatusCode::GATEWAY_TIMEOUT => {
                answers.unknown.fetch_add(1, Ordering::SeqCst);
            }
            status => panic!("unexpected {status}"),
        }
    }
}

async fn two_counters_on_one_database_read_one_exact_total(backend: Backend) {
    let Some(db) = Postgres::start() else { return };
    let url = db.url();
    let (a, b) = (start_counter(backend, &url), start_counter(backend, &url));
    let (a, b) = (a.addr("counter"), b.addr("counter"));
    assert_eq!(counter_tally(a).await, 0);
    let mut tasks = tokio::task::JoinSet::new();
    for counter in [a, b] {
        for _ in 0..16 {
            tasks.spawn(async move {
                let mut client = Client::connect(counter).await;
                for _ in 0..40 {
                    assert_eq!(client.post("/counter").await.status, StatusCode::OK);
                }
            });
        }
    }
    while let Some(result) = tasks.join_next().await {
        result.expect("client");
    }
    assert_eq!(counter_tally(a).await, 2 * 16 * 40);
    assert_eq!(counter_tally(b).await, 2 * 16 * 40);
    assert_eq!(db.total(), 1280);
    // One part per counter process, each its own visits; the base row
    // untouched, so no commit waited on another's.
    assert_eq!(
        db.query("SELECT total FROM gateway_counter_parts ORDER BY total"),
        "640\n640"
    );
    assert_eq!(db.query("SELECT total FROM gateway_counter"), "0");
}

async fn a_database_restart_under_load_loses_no_200_and_counts_nothing_twice(backend: Backend) {
    restart_under_load(backend, Duration::from_millis(500)).await;
}

/// Down for longer than a lost commit is given to settle: its visits are
/// answered 504 (maybe counted, once), the rest as before.
async fn a_database_down_longer_than_settling_still_counts_nothing_twice(backend: Backend) {
    restart_under_load(backend, Duration::from_millis(3500)).await;
}

/// Two counters (one per backend) under load; the database is stopped
/// for `outage` and started again.
async fn restart_under_load(backend: Backend, outage: Duration) {
    let Some(db) = Postgres::start() else { return };
    let url = db.url();
    let counters = [
        start_counter(backend, &url),
        start_counter(common::other_backend(backend), &url),
    ];
    let mut load = Load::start(&counters);
    tokio::time::sleep(Duration::from_millis(700)).await;
    let before: u64 = load.answers.iter().map(|a| a.ok()).sum();
    assert!(before > 0, "no 200 before the restart");

    let db = tokio::task::spawn_blocking(move || {
        db.stop_server();
        std::thread::sleep(outage);
        let back = db.start_server();
        (db, back)
    });
    let (db, back) = db.await.expect("the restart");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (ok, refused, unknown) = load.stop().await;
    let total = db.total();
    eprintln!("restart: {ok} × 200, {refused} × 503, {unknown} × 504; database total {total}");
    assert!(
        counters
            .iter()
            .any(|c| c.log_text().contains("lost the database")),
        "the outage was never seen"
    );
    assert!(
        ok <= total && total <= ok + unknown,
        "200s {ok}, 504s {unknown}, counted {total}"
    );
    for (counter, answers) in counters.iter().zip(&load.answers) {
        // 200s resumed: the last one came well after the database was back.
        let last = answers.last_ok_us.load(Ordering::SeqCst);
        assert!(
            last > load.us(back) + 1_000_000,
            "no 200 in the second after the database came back:\n{}",
            counter.log_text()
        );
        assert_eq!(counter_tally(counter.addr("counter")).await, total);
    }
}

async fn two_hundreds_resume_within_a_second_of_the_database_coming_back(backend: Backend) {
    let Some(db) = Postgres::start() else { return };
    db.stop_server();
    // Started before its database: it serves, and answers 503 meanwhile.
    let counter = start_counter(backend, &db.url());
    let addr = counter.addr("counter");
    let mut client = Client::connect(addr).await;
    let answer = client.post("/counter").await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.headers["retry-after"], "1");
    assert_eq!(
        client.get("/counter").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );

    let db = tokio::task::spawn_blocking(move || {
        let back = db.start_server();
        (db, back)
    });
    let (db, back) = db.await.expect("the start");
    let resumed = common::eventually(
        "a 200 once the database is back",
        Duration::from_secs(5),
        async || match client.post("/counter").await.status {
            StatusCode::OK => Ok(back.elapsed()),
            status => Err(common::Text(format!(
                "{status}; the counter's log:\n{}",
                counter.log_text()
            ))),
        },
    )
    .await;
    eprintln!("first 200 {resumed:?} after the database was back");
    assert!(resumed < Duration::from_secs(1), "{resumed:?}");
    assert_eq!(counter_tally(addr).await, 1);
    assert_eq!(db.total(), 1);
}

/// `answer`, or a failed test (with the counter's log) if it has not come
/// within 10 s: a counter that hangs fails the test instead of holding it.
async fn within_10_s(counter: &Process, answer: impl Future<Output = Answer>) -> Answer {
    tokio::time::timeout(Duration::from_secs(10), answer)
        .await
        .unwrap_or_else(|_| panic!("no answer within 10 s:\n{}", counter.log_text()))
}

/// A database host that accepts connections and never answers (a hung
/// proxy, a stopped postmaster: its kernel acknowledges everything, so no
/// TCP timeout fires): the counter starts within its connect timeout and
/// answers 503, without a new connection per visit while its one attempt
/// has no answer; once the silent end lets that go, it tries again.
async fn a_database_that_never_answers_holds_neither_the_start_nor_the_visits(backend: Backend) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let held = Arc::new(std::sync::Mutex::new(Vec::new()));
    let accepted = Arc::new(AtomicU64::new(0));
    let silent = {
        let (held, accepted) = (held.clone(), accepted.clone());
        tokio::spawn(async move {
            while let Ok((connection, _)) = listener.accept().await {
                held.lock().unwrap().push(connection);
                accepted.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    let url = format!("postgres://gateway@127.0.0.1:{port}/gateway");
    let started = Instant::now();
    let counter = tokio::task::block_in_place(|| start_counter(backend, &url));
    let took = started.elapsed();
    assert!(took < Duration::from_secs(8), "started after {took:?}");
    assert!(
        counter.log_text().contains("cannot reach the database"),
        "{}",
        counter.log_text()
    );

    let addr = counter.addr("counter");
    let mut client = Client::connect(addr).await;
    for _ in 0..4 {
        let answer = within_10_s(&counter, client.post("/counter")).await;
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
        let answer = within_10_s(&counter, client.get("/counter")).await;
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
        // Past the reconnect interval, so that each visit looks again.
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "a new connection while one had no answer:\n{}",
        counter.log_text()
    );

    // The connection ends (here closed; a timeout, a restart): so does the
    // attempt, and the next one is made.
    held.lock().unwrap().clear();
    common::eventually(
        "a new attempt once the first ended",
        Duration::from_secs(5),
        async || {
            if accepted.load(Ordering::SeqCst) >= 2 {
                return Ok(());
            }
            let answer = within_10_s(&counter, client.post("/counter")).await;
            assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
            // A visit every 150 ms or so, with the wait between probes.
            tokio::time::sleep(Duration::from_millis(130)).await;
            Err(common::Text(format!(
                "the counter's log:\n{}",
                counter.log_text()
            )))
        },
    )
    .await;
    silent.abort();
}

/// The postmaster hangs (SIGSTOP) under a counter that has counted and
/// must connect again (its session ended): visits are answered 503 within
/// the connect timeout, not held; once the postmaster goes on, the
/// attempt it answers late is used, 200s resume, and the count is exact.
async fn a_hung_postmaster_is_answered_503_and_counting_resumes_after_it(backend: Backend) {
    let Some(db) = Postgres::start() else { return };
    let counter = start_counter(backend, &db.url());
    let addr = counter.addr("counter");
    let mut client = Client::connect(addr).await;
    let mut counted = 0;
    for _ in 0..2 {
        let answer = within_10_s(&counter, client.post("/counter")).await;
        assert_eq!(answer.status, StatusCode::OK);
        counted += 1;
    }
    assert_eq!(db.terminate_counter_sessions(), 1);

    let frozen = db.freeze();
    for _ in 0..3 {
        let sent = Instant::now();
        let answer = within_10_s(&counter, client.post("/counter")).await;
        let took = sent.elapsed();
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            took < Duration::from_secs(4),
            "answered after {took:?}:\n{}",
            counter.log_text()
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    drop(frozen);

    common::eventually(
        "a 200 since the postmaster went on",
        Duration::from_secs(5),
        async || {
            let answer = within_10_s(&counter, client.post("/counter")).await;
            match answer.status {
                StatusCode::OK => Ok(()),
                StatusCode::SERVICE_UNAVAILABLE => Err(common::Text(format!(
                    "503; the counter's log:\n{}",
                    counter.log_text()
                ))),
                status => panic!("unexpected {status}:\n{}", counter.log_text()),
            }
        },
    )
    .await;
    counted += 1;
    let answer = within_10_s(&counter, client.post("/counter")).await;
    assert_eq!(answer.status, StatusCode::OK);
    counted += 1;
    assert_eq!(counter_tally(addr).await, counted);
    assert_eq!(db.total(), counted);
}

async fn a_database_that_refuses_the_counter_stops_its_start(backend: Backend) {
    let Some(db) = Postgres::start() else { return };
    let url = format!("postgres://gateway@127.0.0.1:{}/no_such_database", db.port);
    let out = counter_command(backend, &url)
        .output()
        .expect("run the counter");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "postgres://gateway@127.0.0.1:{}/no_such_database",
            db.port
        )) && stderr.contains("FATAL: database \"no_such_database\" does not exist"),
        "{stderr}"
    );
}

async fn the_gateway_counts_in_the_database_across_a_backend_switch(backend: Backend) {
    let Some(db) = Postgres::start() else { return };
    let counter = common::TestUpstream::closed_port().await;
    let start = |backend: Backend| {
        let text = format!(
            "[runtime]\nbackend = \"{}\"\nworkers = 2\n[server]\nlisten = \"127.0.0.1:0\"\n\
             [upstream]\nurl = \"http://{counter}/counter\"\n\
             [counter]\nlisten = \"{counter}\"\nstore = \"postgres\"\npostgres_url = \"{}\"\n",
            backend.name(),
            db.url()
        );
        let config = db.folder().join("gateway.toml");
        std::fs::write(&config, text).unwrap();
        let mut command = Command::new(common::gateway_binary());
        command.arg("--config").arg(&config).env_remove("RUST_LOG");
        Process::start_command(command, 2)
    };
    let daemon = start(backend);
    common::visit_concurrently(daemon.addr("public"), 5, 2).await;
    daemon.terminate();
    daemon.assert_exits_0_within(Duration::from_secs(5)).await;
    let daemon = start(common::other_backend(backend));
    assert_eq!(counter_tally(counter).await, 10, "the count came through");
    common::visit_concurrently(daemon.addr("public"), 3, 1).await;
    assert_eq!(counter_tally(counter).await, 13);
}

/// The realistic shape: two counter hosts and a database host, network
/// namespaces on a bridge. One count across both; then host 1 is cut off
/// from the database, silently (its packets dropped), for longer than a
/// connection takes to count as lost: host 2 goes on counting, host 1's
/// lost commit is settled once the network is back, and nothing is lost
/// or counted twice.
async fn two_hosts_share_one_count_through_a_partition(backend: Backend) {
    let Some(network) = Network::create(3) else {
        return;
    };
    let database = network.host(0);
    let Some(db) = Postgres::start_in(Some(&database.name), database.addr) else {
        return;
    };
    let counters: Vec<Process> = [1, 2]
        .into_iter()
        .map(|i| {
            let mut command = network.command(i, common::gateway_binary());
            command
                .args(["counter", "--backend", backend.name(), "--listen"])
                .arg(format!("{}:3001", network.host(i).addr))
                .args(["--store", "postgres", "--postgres-url", &db.url()])
                .env_remove("RUST_LOG");
            Process::start_command(command, 1)
        })
        .collect();
    let mut load = Load::start(&counters);
    tokio::time::sleep(Duration::from_millis(700)).await;

    network.cut(1, 0);
    let host2_before = load.answers[1].ok();
    tokio::time::sleep(Duration::from_millis(6500)).await;
    let host2_during = load.answers[1].ok() - host2_before;
    network.heal(1, 0);
    let healed = Instant::now();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (ok, _, unknown) = load.stop().await;
    let total = db.total();
    let refused = load.answers[0].refused.load(Ordering::SeqCst);
    eprintln!(
        "partition: {ok} × 200 ({host2_during} on host 2 during the cut), host 1 {refused} × 503, \
         {unknown} × 504; database total {total}"
    );
    assert!(
        ok <= total && total <= ok + unknown,
        "200s {ok}, 504s {unknown}, counted {total}"
    );
    assert!(
        host2_during > 0,
        "host 2 stopped counting while host 1 was cut off"
    );
    assert!(
        counters[0].log_text().contains("lost the database"),
        "the partition went unnoticed:\n{}",
        counters[0].log_text()
    );
    let last = load.answers[0].last_ok_us.load(Ordering::SeqCst);
    assert!(
        last > load.us(healed),
        "host 1 never counted again after the network came back:\n{}",
        counters[0].log_text()
    );
    for counter in &counters {
        assert_eq!(counter_tally(counter.addr("counter")).await, total);
    }
}

/// A TCP relay to the database whose client-side sockets the test can
/// reset while their database-side halves stay open, so that the server
/// goes on with a transaction whose client is gone: what a dead proxy or
/// pooler between them does.
struct Relay {
    addr: SocketAddr,
    /// The counter-side sockets of the relayed connections so far.
    clients: Arc<std::sync::Mutex<Vec<std::os::fd::OwnedFd>>>,
}

impl Relay {
    async fn start(to: SocketAddr) -> Self {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let clients = Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = clients.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let server = tokio::net::TcpStream::connect(to).await.unwrap();
                let client = client.into_std().unwrap();
                kept.lock()
                    .unwrap()
                    .push(std::os::fd::OwnedFd::from(client.try_clone().unwrap()));
                let client = tokio::net::TcpStream::from_std(client).unwrap();
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
                    // The server side stays open: its session goes on.
                    std::future::pending::<()>().await;
                });
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
                    let _ = client_write.shutdown().await;
                });
            }
        });
        Self { addr, clients }
    }

    /// Resets every relayed connection on the counter's side.
    fn reset_clients(&self) {
        for fd in self.clients.lock().unwrap().drain(..) {
            let socket = socket2::Socket::from(fd);
            let _ = socket.set_linger(Some(Duration::ZERO));
            let _ = socket.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// The connection is lost while the commit waits for a lock held
/// elsewhere, and the server, which never noticed, commits it after the
/// counter has reconnected: settling waits for that transaction and
/// answers the visit 200, counted once.
async fn a_commit_that_ends_after_its_connection_was_lost_is_settled_as_counted(backend: Backend) {
    let Some(db) = Postgres::start() else { return };
    let relay = Relay::start(SocketAddr::from(([127, 0, 0, 1], db.port))).await;
    let url = format!("postgres://gateway@{}/postgres", relay.addr);
    let counter = start_counter(backend, &url);
    let addr = counter.addr("counter");
    let mut client = Client::connect(addr).await;
    assert_eq!(client.post("/counter").await.status, StatusCode::OK);

    // Another session holds the writer's part for 1.5 s.
    let holder = db.spawn_query(
        "BEGIN; SELECT FROM gateway_counter_parts FOR UPDATE; SELECT pg_sleep(1.5); COMMIT;",
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let visit = tokio::spawn(async move { client.post("/counter").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    relay.reset_clients();

    let answer = visit.await.expect("the visit");
    holder.wait_with_output().expect("the holding session");
    assert_eq!(answer.status, StatusCode::OK, "{}", counter.log_text());
    assert_eq!(db.total(), 2);
    assert!(
        counter.log_text().contains("had committed"),
        "{}",
        counter.log_text()
    );
}

/// A lock held elsewhere for longer than a statement may wait: the server
/// cancels the commit (an error, so nothing of it committed), the visit
/// is answered 503 instead of hanging, and the next one counts.
async fn a_commit_stuck_behind_a_lock_is_refused_not_held(backend: Backend) {
    let Some(db) = Postgres::start() else { return };
    let counter = start_counter(backend, &db.url());
    let addr = counter.addr("counter");
    let mut client = Client::connect(addr).await;
    assert_eq!(client.post("/counter").await.status, StatusCode::OK);
    let holder = db.spawn_query(
        "BEGIN; SELECT FROM gateway_counter_parts FOR UPDATE; SELECT pg_sleep(7); COMMIT;",
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Refused, not answered 200 once the lock was released at 7 s.
    let answer = client.post("/counter").await;
    assert_eq!(
        answer.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        counter.log_text()
    );
    holder.wait_with_output().expect("the holding session");
    assert_eq!(client.post("/counter").await.status, StatusCode::OK);
    assert_eq!(db.total(), 2);
}

/// Visits a counter whose database connection the server has closed
/// meanwhile: each is counted, once. The close was seen before the batch
/// was sent, so the batch goes out on a new connection instead of being
/// refused.
async fn post_after_each_close(counter: &Process, visits: u64, close: impl Fn()) {
    let addr = counter.addr("counter");
    let mut client = Client::connect(addr).await;
    for visit in 1..=visits {
        tokio::task::block_in_place(&close);
        let answer = client.post("/counter").await;
        assert_eq!(
            answer.status,
            StatusCode::OK,
            "visit {visit}:\n{}",
            counter.log_text()
        );
    }
    assert_eq!(counter_tally(addr).await, visits);
}

/// A server that ends idle sessions (`idle_session_timeout`, as a pooler or
/// a failover proxy does too): the visits that come after each idle
/// spell are counted, not refused.
async fn a_database_that_closes_idle_sessions_still_counts_every_visit(backend: Backend) {
    let Some(db) = Postgres::start() else { return };
    db.query("ALTER ROLE gateway SET idle_session_timeout = '400ms'");
    let counter = start_counter(backend, &db.url());
    post_after_each_close(&counter, 5, || {
        std::thread::sleep(Duration::from_millis(900))
    })
    .await;
    assert_eq!(db.total(), 5);
    assert!(
        counter
            .log_text()
            .contains("terminating connection due to idle-session timeout"),
        "the closes went unseen:\n{}",
        counter.log_text()
    );
}

/// Ends the one counter's session from another, then lets it sit closed a
/// while, as an operator's or a pooler's close comes between visits.
fn end_the_counters_session(db: &Postgres) {
    assert_eq!(db.terminate_counter_sessions(), 1);
    std::thread::sleep(Duration::from_millis(50));
}

/// An operator's `pg_terminate_backend` of the counter's session: the next
/// visits are counted on a new connection, which makes no tables again.
async fn a_terminated_session_is_replaced_without_refusing_visits(backend: Backend) {
    let Some(db) = Postgres::start() else { return };
    let counter = start_counter(backend, &db.url());
    assert_eq!(counter_tally(counter.addr("counter")).await, 0);
    post_after_each_close(&counter, 3, || end_the_counters_session(&db)).await;
    assert_eq!(db.total(), 3);
    let log = counter.log_text();
    assert!(!log.contains("already exists"), "{log}");
    assert!(!log.contains("lost the database"), "{log}");
}

/// A least-privilege deployment: the tables made once (here by a first
/// start as their owner), then the counter run as a role that may only
/// read and write their rows, with no `CREATE` on the schema. It starts,
/// counts, reconnects, and logs no notice about tables that exist.
async fn a_role_that_may_only_use_the_tables_runs_the_counter(backend: Backend) {
    let Some(db) = Postgres::start() else { return };
    let owner = start_counter(backend, &db.url());
    assert_eq!(counter_tally(owner.addr("counter")).await, 0);
    drop(owner);
    db.query(
        "CREATE ROLE visits LOGIN; \
         REVOKE CREATE ON SCHEMA public FROM PUBLIC; \
         GRANT USAGE ON SCHEMA public TO visits; \
         GRANT SELECT, INSERT, UPDATE, DELETE ON gateway_counter, gateway_counter_parts TO visits",
    );
    assert_eq!(
        db.query("SELECT has_schema_privilege('visits', 'public', 'CREATE')"),
        "f"
    );
    let counter = start_counter(backend, &db.url_as("visits"));
    let addr = counter.addr("counter");
    let mut client = Client::connect(addr).await;
    assert_eq!(client.post("/counter").await.status, StatusCode::OK);
    end_the_counters_session(&db);
    assert_eq!(
        client.post("/counter").await.status,
        StatusCode::OK,
        "{}",
        counter.log_text()
    );
    assert_eq!(counter_tally(addr).await, 2);
    assert_eq!(db.total(), 2);
    let log = counter.log_text();
    assert!(!log.contains("already exists"), "{log}");
}

/// POSTs and GETs to a counter whose count was removed under it: each is
/// refused, across reconnects too.
async fn refused_while_removed(client: &mut Client, counter: &Process, db: &Postgres) {
    for _ in 0..3 {
        assert_eq!(
            client.post("/counter").await.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{}",
            counter.log_text()
        );
        assert_eq!(
            client.get("/counter").await.status,
            StatusCode::SERVICE_UNAVAILABLE
        );
        db.terminate_counter_sessions();
    }
}

/// The total's row deleted, then the tables dropped, under a running
/// counter: its visits are refused, and neither is made again behind the
/// operator's back (which would start the count again from 0). The row
/// restored, counting goes on from it.
async fn a_count_removed_under_a_running_counter_is_an_error_not_a_fresh_count(backend: Backend) {
    let Some(db) = Postgres::start() else { return };
    let counter = start_counter(backend, &db.url());
    let addr = counter.addr("counter");
    let mut client = Client::connect(addr).await;
    for _ in 0..3 {
        assert_eq!(client.post("/counter").await.status, StatusCode::OK);
    }

    let base = db.query("SELECT total FROM gateway_counter");
    db.query("DELETE FROM gateway_counter");
    refused_while_removed(&mut client, &counter, &db).await;
    assert_eq!(
        db.query("SELECT count(*) FROM gateway_counter"),
        "0",
        "the row was made again:\n{}",
        counter.log_text()
    );
    assert!(
        counter
            .log_text()
            .contains("base row (gateway_counter, id = 1) is gone"),
        "{}",
        counter.log_text()
    );
    db.query(&format!(
        "INSERT INTO gateway_counter (id, total) VALUES (1, {base})"
    ));
    assert_eq!(client.post("/counter").await.status, StatusCode::OK);
    assert_eq!(counter_tally(addr).await, 4);

    db.query("DROP TABLE gateway_counter, gateway_counter_parts");
    refused_while_removed(&mut client, &counter, &db).await;
    assert_eq!(
        db.query("SELECT to_regclass('gateway_counter') IS NULL"),
        "t",
        "the tables were made again:\n{}",
        counter.log_text()
    );
    assert!(
        counter.log_text().contains("tables are gone"),
        "{}",
        counter.log_text()
    );
}

/// The schema as the counter made it before each writer had a part of
/// its own (schema.rs as of 7c073bf, verbatim): one row for the whole
/// count, and each writer's last batch beside it.
const ONE_ROW_SCHEMA: &str = "CREATE TABLE gateway_counter (
    id smallint PRIMARY KEY CHECK (id = 1),
    total bigint NOT NULL CHECK (total >= 0));
  CREATE TABLE gateway_counter_writers (
    writer text PRIMARY KEY,
    last_batch bigint NOT NULL,
    updated timestamptz NOT NULL);";

/// A database made by the version with one row for the whole count is
/// upgraded by the first start: its count is kept exactly in the base
/// row, the visits go to the writer's part, and a counter of the old
/// version still running (its commit, as it sends it) adds to the same
/// count.
async fn a_one_row_database_is_upgraded_in_place_and_keeps_its_count(backend: Backend) {
    let Some(db) = Postgres::start() else { return };
    db.query(&format!(
        "{ONE_ROW_SCHEMA}
         INSERT INTO gateway_counter (id, total) VALUES (1, 1234);
         INSERT INTO gateway_counter_writers VALUES ('{}', 17, now());",
        "ab".repeat(16)
    ));
    let counter = start_counter(backend, &db.url());
    let addr = counter.addr("counter");
    assert_eq!(counter_tally(addr).await, 1234);
    let mut client = Client::connect(addr).await;
    for _ in 0..5 {
        assert_eq!(client.post("/counter").await.status, StatusCode::OK);
    }
    assert_eq!(counter_tally(addr).await, 1239);
    assert_eq!(db.query("SELECT total FROM gateway_counter"), "1234");
    assert_eq!(db.query("SELECT total FROM gateway_counter_parts"), "5");
    // The old version's commit, on the row it knows.
    db.query("UPDATE gateway_counter SET total = total + 10 WHERE id = 1");
    assert_eq!(counter_tally(addr).await, 1249);
    assert_eq!(db.total(), 1249);
    assert_eq!(
        db.query("SELECT last_batch FROM gateway_counter_writers"),
        "17",
        "the old version's table is left to it"
    );
}

/// A writer with no commit for a week is folded into the base row by the
/// next counter to start, in one transaction: the count does not move,
/// and a part less idle stays.
async fn an_idle_writers_part_is_folded_into_the_base_row(backend: Backend) {
    let Some(db) = Postgres::start() else { return };
    let first = start_counter(backend, &db.url());
    let mut client = Client::connect(first.addr("counter")).await;
    for _ in 0..3 {
        assert_eq!(client.post("/counter").await.status, StatusCode::OK);
    }
    drop((client, first));
    db.query(&format!(
        "UPDATE gateway_counter_parts SET updated = now() - interval '8 days';
         INSERT INTO gateway_counter_parts VALUES ('{}', 7, 1, now() - interval '6 days');",
        "cd".repeat(16)
    ));
    assert_eq!(db.total(), 10);

    let second = start_counter(backend, &db.url());
    assert_eq!(counter_tally(second.addr("counter")).await, 10);
    assert_eq!(db.total(), 10);
    assert_eq!(db.query("SELECT total FROM gateway_counter"), "3");
    assert_eq!(
        db.query("SELECT writer, total FROM gateway_counter_parts"),
        format!("{}|7", "cd".repeat(16))
    );
}

both_backends!(
    a_one_row_database_is_upgraded_in_place_and_keeps_its_count,
    an_idle_writers_part_is_folded_into_the_base_row,
    a_database_that_closes_idle_sessions_still_counts_every_visit,
    a_terminated_session_is_replaced_without_refusing_visits,
    a_role_that_may_only_use_the_tables_runs_the_counter,
    a_count_removed_under_a_running_counter_is_an_error_not_a_fresh_count,
    a_commit_stuck_behind_a_lock_is_refused_not_held,
    a_commit_that_ends_after_its_connection_was_lost_is_settled_as_counted,
    two_hosts_share_one_count_through_a_partition,
    two_counters_on_one_database_read_one_exact_total,
    a_database_restart_under_load_loses_no_200_and_counts_nothing_twice,
    a_database_down_longer_than_settling_still_counts_nothing_twice,
    two_hundreds_resume_within_a_second_of_the_database_coming_back,
    a_database_that_refuses_the_counter_stops_its_start,
    a_database_that_never_answers_holds_neither_the_start_nor_the_visits,
    a_hung_postmaster_is_answered_503_and_counting_resumes_after_it,
    the_gateway_counts_in_the_database_across_a_backend_switch,
);
