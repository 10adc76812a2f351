//! The built-in counter's file store: a 200 outlives the process. The
//! count comes through a SIGTERM restart that switches backend, and a
//! `kill -9` under load (never below the 200s answered, never above them
//! plus the visits in flight); a corrupt state file or a second process on
//! it stops the start, naming the file; a write the disk refuses is a 503
//! from the counter (a 502 for the visit), never a 200.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::{Backend, Client, GatewayConfig, Process, TestUpstream, counter_tally};
use http::StatusCode;

fn other(backend: Backend) -> Backend {
    match backend {
        Backend::Tokio => Backend::Smol,
        Backend::Smol => Backend::Tokio,
    }
}

/// The shipped layout: the gateway and its built-in counter in one
/// process, the counter on `counter` and its state in `state`.
fn start_daemon(backend: Backend, counter: SocketAddr, state: &Path) -> Process {
    let text = format!(
        "[runtime]\nbackend = \"{}\"\nworkers = 2\n[server]\nlisten = \"127.0.0.1:0\"\n\
         [upstream]\nurl = \"http://{counter}/counter\"\n\
         [counter]\nlisten = \"{counter}\"\nstore = \"file\"\npath = {:?}\n",
        backend.name(),
        state
    );
    let config = state.with_extension("toml");
    std::fs::write(&config, text).unwrap();
    let mut command = Command::new(common::gateway_binary());
    command.arg("--config").arg(&config).env_remove("RUST_LOG");
    Process::start_command(command, 2)
}

/// `gateway counter` on `listen` with its state in `state`, run through
/// `sh -c` so that `limits` (e.g. `ulimit -f 0`) apply to it.
fn counter_command(backend: Backend, listen: SocketAddr, state: &Path, limits: &str) -> Command {
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(format!("{limits} exec \"$0\" \"$@\""))
        .arg(common::gateway_binary())
        .args(["counter", "--backend", backend.name(), "--listen"])
        .arg(listen.to_string())
        .arg("--path")
        .arg(state)
        .env_remove("RUST_LOG");
    command
}

/// Runs a counter that is expected not to start; its output.
fn failed_start(mut command: Command) -> Output {
    command.output().expect("run gateway counter")
}

async fn the_count_survives_a_restart_that_switches_backend(backend: Backend) {
    let state_dir = tempfile::tempdir().unwrap();
    let state = state_dir.path().join("counter.state");
    let counter = TestUpstream::closed_port().await;
    let daemon = start_daemon(backend, counter, &state);
    common::visit_concurrently(daemon.addr("public"), 5, 1).await;
    assert_eq!(counter_tally(counter).await, 5);
    daemon.terminate();
    daemon.assert_exits_0_within(Duration::from_secs(5)).await;

    let daemon = start_daemon(other(backend), counter, &state);
    assert_eq!(counter_tally(counter).await, 5, "the count came through");
    common::visit_concurrently(daemon.addr("public"), 3, 1).await;
    assert_eq!(counter_tally(counter).await, 8);
}

async fn a_kill_9_under_load_loses_no_200(backend: Backend) {
    const CLIENTS: u64 = 8;
    let state_dir = tempfile::tempdir().unwrap();
    let state = state_dir.path().join("counter.state");
    let listen = TestUpstream::closed_port().await;
    let counter = Process::start_command(counter_command(backend, listen, &state, ""), 1);
    let gateway = GatewayConfig::new(backend, listen).start();
    let public = gateway.addr("public");
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..CLIENTS {
        let (stop, ok) = (stop.clone(), ok.clone());
        clients.spawn(async move {
            let mut client = Client::connect(public).await;
            while !stop.load(Ordering::SeqCst) {
                match client.send(common::request("GET", "/")).await {
                    Ok(answer) if answer.status == StatusCode::OK => {
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(answer) => assert_eq!(answer.status, StatusCode::BAD_GATEWAY),
                    Err(error) => panic!("the gateway always answers: {error}"),
                }
            }
        });
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    // SIGKILL: no drain, no last sync; whatever was answered 200 is on disk.
    let mut counter = counter;
    counter.child.kill().unwrap();
    counter.child.wait().unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::SeqCst);
    while let Some(client) = clients.join_next().await {
        client.expect("client task");
    }
    let answered = ok.load(Ordering::SeqCst);
    assert!(answered > 0, "no visit was counted before the kill");

    let _restarted = Process::start_command(counter_command(other(backend), listen, &state, ""), 1);
    let count = counter_tally(listen).await;
    eprintln!(
        "{}: {answered} visits answered 200 before the kill; {count} counted after it",
        backend.name()
    );
    assert!(
        count >= answered,
        "{count} counted, {answered} answered 200"
    );
    assert!(
        count <= answered + CLIENTS,
        "{count} counted, {answered} answered 200 and at most {CLIENTS} in flight"
    );
}

async fn a_corrupt_state_file_stops_the_start_naming_it(backend: Backend) {
    let state_dir = tempfile::tempdir().unwrap();
    let state = state_dir.path().join("counter.state");
    std::fs::write(
        &state,
        b"not a counter state, 64 bytes long .............................",
    )
    .unwrap();
    let listen = TestUpstream::closed_port().await;
    let output = failed_start(counter_command(backend, listen, &state, ""));
    assert_eq!(output.status.code(), Some(1));
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(message.contains(&state.display().to_string()), "{message}");
    assert!(
        message.contains("not a readable counter state"),
        "{message}"
    );
    // And it is still there, untouched, for the operator to look at.
    assert_eq!(std::fs::read(&state).unwrap().len(), 64);
}

async fn a_second_process_on_the_state_file_is_refused(backend: Backend) {
    let state_dir = tempfile::tempdir().unwrap();
    let state = state_dir.path().join("counter.state");
    let first = TestUpstream::closed_port().await;
    let _running = Process::start_command(counter_command(backend, first, &state, ""), 1);
    let second = TestUpstream::closed_port().await;
    let output = failed_start(counter_command(backend, second, &state, ""));
    assert_eq!(output.status.code(), Some(1));
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(message.contains(&state.display().to_string()), "{message}");
    assert!(message.contains("in use by another process"), "{message}");
}

async fn a_write_the_disk_refuses_is_never_a_200(backend: Backend) {
    let state_dir = tempfile::tempdir().unwrap();
    let state = state_dir.path().join("counter.state");
    let listen = TestUpstream::closed_port().await;
    // A first run creates the state file and counts two visits.
    let counter = Process::start_command(counter_command(backend, listen, &state, ""), 1);
    let mut client = Client::connect(listen).await;
    for _ in 0..2 {
        let answer = client.post("/counter").await;
        assert_eq!(answer.status, StatusCode::OK);
    }
    drop(client);
    counter.terminate();
    counter.assert_exits_0_within(Duration::from_secs(5)).await;
    // Now no byte may be written (RLIMIT_FSIZE 0, as a full disk refuses).
    let counter = Process::start_command(
        counter_command(backend, listen, &state, "ulimit -f 0 &&"),
        1,
    );
    let gateway = GatewayConfig::new(backend, listen).start();
    let mut client = Client::connect(listen).await;
    for _ in 0..3 {
        let answer = client.post("/counter").await;
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    }
    let visit = common::get(gateway.addr("public"), "/").await;
    assert_eq!(visit.status, StatusCode::BAD_GATEWAY);
    assert_eq!(
        counter_tally(listen).await,
        2,
        "nothing refused was counted"
    );
    assert!(
        counter.log_text().contains("commit refused"),
        "{}",
        counter.log_text()
    );
}

both_backends!(
    the_count_survives_a_restart_that_switches_backend,
    a_kill_9_under_load_loses_no_200,
    a_corrupt_state_file_stops_the_start_naming_it,
    a_second_process_on_the_state_file_is_refused,
    a_write_the_disk_refuses_is_never_a_200,
);
