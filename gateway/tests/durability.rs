//! The built-in counter's file store: a 200 outlives the process. The
//! count comes through a SIGTERM restart that switches backend, and a
//! `kill -9` under load (never below the 200s answered, never above them
//! plus the visits in flight); a corrupt state file or a second process on
//! it stops the start, naming the file; a write the disk refuses is a 503
//! from the counter (a 502 for the visit), never a 200. Making a state
//! file removes nothing else, a torn first commit leaves the new file
//! readable, and a state file removed while in use is written again.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::{Backend, Client, GatewayConfig, Process, TestUpstream, counter_tally};
use http::StatusCode;

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

    let daemon = start_daemon(common::other_backend(backend), counter, &state);
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

    let _restarted = Process::start_command(
        counter_command(common::other_backend(backend), listen, &state, ""),
        1,
    );
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

/// `count` POSTs to the counter at `listen`, each answered 200.
async fn count_visits(listen: SocketAddr, count: u64) {
    let mut client = Client::connect(listen).await;
    for _ in 0..count {
        assert_eq!(client.post("/counter").await.status, StatusCode::OK);
    }
}

/// Stops the counter with SIGTERM, waiting for it to exit 0.
async fn stop(counter: Process) {
    counter.terminate();
    counter.assert_exits_0_within(Duration::from_secs(5)).await;
}

/// A counter creating its state file removes no file it did not make,
/// whatever its name: here the live state file of another counter, named
/// as an earlier version named its own temporary file.
async fn a_new_state_file_removes_no_file_beside_it(backend: Backend) {
    let state_dir = tempfile::tempdir().unwrap();
    let other_state = state_dir.path().join("s.new");
    let other_listen = TestUpstream::closed_port().await;
    let neighbour =
        Process::start_command(counter_command(backend, other_listen, &other_state, ""), 1);
    count_visits(other_listen, 20).await;

    let listen = TestUpstream::closed_port().await;
    let state = state_dir.path().join("s");
    let counter = Process::start_command(counter_command(backend, listen, &state, ""), 1);
    assert!(
        other_state.exists(),
        "the other counter's state file was removed"
    );
    stop(counter).await;
    count_visits(other_listen, 2).await;
    stop(neighbour).await;

    let _restarted = Process::start_command(
        counter_command(
            common::other_backend(backend),
            other_listen,
            &other_state,
            "",
        ),
        1,
    );
    assert_eq!(
        counter_tally(other_listen).await,
        22,
        "every visit answered 200 is counted"
    );
}

/// The first commit into a new state file writes the slot the file was
/// made without: torn by a crash, it leaves the file's first slot, and the
/// counter starts from it.
async fn a_torn_first_commit_leaves_the_new_file_readable(backend: Backend) {
    let state_dir = tempfile::tempdir().unwrap();
    let state = state_dir.path().join("counter.state");
    let listen = TestUpstream::closed_port().await;
    let counter = Process::start_command(counter_command(backend, listen, &state, ""), 1);
    count_visits(listen, 1).await;
    stop(counter).await;
    // The slot holding sequence number 2 (little-endian, after the 8-byte
    // magic) is the first commit's: 16 bytes of it as a torn write leaves them.
    let bytes = std::fs::read(&state).unwrap();
    let first_commit = (0..2)
        .find(|slot| bytes[slot * 32 + 8..slot * 32 + 16] == 2u64.to_le_bytes())
        .expect("a slot with sequence 2");
    let mut torn = bytes.clone();
    torn[first_commit * 32 + 8..first_commit * 32 + 24].fill(0xa5);
    std::fs::write(&state, torn).unwrap();

    let _restarted = Process::start_command(counter_command(backend, listen, &state, ""), 1);
    assert_eq!(
        counter_tally(listen).await,
        0,
        "the commit torn was never answered"
    );
}

/// A state file removed while the counter holds it (an operator's `rm`, a
/// cleaner of old files) is written again with its count at the next
/// commit: no 200 goes into a file the next start cannot read.
async fn a_state_file_removed_while_counting_is_written_again(backend: Backend) {
    let state_dir = tempfile::tempdir().unwrap();
    let state = state_dir.path().join("counter.state");
    let listen = TestUpstream::closed_port().await;
    let counter = Process::start_command(counter_command(backend, listen, &state, ""), 1);
    count_visits(listen, 3).await;
    std::fs::remove_file(&state).unwrap();
    count_visits(listen, 2).await;
    assert!(state.exists(), "the state file was not written again");
    assert!(
        counter.log_text().contains("written again with its count"),
        "{}",
        counter.log_text()
    );
    stop(counter).await;

    let _restarted = Process::start_command(
        counter_command(common::other_backend(backend), listen, &state, ""),
        1,
    );
    assert_eq!(counter_tally(listen).await, 5);
}

/// A state file that cannot be made (no byte may be written: SIGXFSZ, whose
/// default action would kill the process unannounced) stops the start with
/// exit 1 naming it, and leaves nothing behind.
async fn a_state_file_that_cannot_be_made_stops_the_start_naming_it(backend: Backend) {
    let state_dir = tempfile::tempdir().unwrap();
    let state = state_dir.path().join("c.state");
    let listen = TestUpstream::closed_port().await;
    let output = failed_start(counter_command(backend, listen, &state, "ulimit -f 0 &&"));
    let message = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{message}");
    assert!(message.contains(&state.display().to_string()), "{message}");
    assert!(message.contains("cannot create it"), "{message}");
    let left: Vec<_> = std::fs::read_dir(state_dir.path()).unwrap().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

both_backends!(
    a_new_state_file_removes_no_file_beside_it,
    a_torn_first_commit_leaves_the_new_file_readable,
    a_state_file_removed_while_counting_is_written_again,
    a_state_file_that_cannot_be_made_stops_the_start_naming_it,
    the_count_survives_a_restart_that_switches_backend,
    a_kill_9_under_load_loses_no_200,
    a_corrupt_state_file_stops_the_start_naming_it,
    a_second_process_on_the_state_file_is_refused,
    a_write_the_disk_refuses_is_never_a_200,
);
