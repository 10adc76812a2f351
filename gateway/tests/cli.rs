//! README, "Command line" and "Configuration": the command line, configuration errors and exit statuses.

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use common::{Backend, GatewayConfig, Threading};
use gateway::config::Named;

fn gateway(args: &[&str], config: Option<&str>) -> Output {
    let file = tempfile::NamedTempFile::new().unwrap();
    let mut command = Command::new(common::gateway_binary());
    if let Some(text) = config {
        std::fs::write(file.path(), text).unwrap();
        command.arg("--config").arg(file.path());
    }
    command
        .args(args)
        .env_remove("GATEWAY_CONFIG")
        .output()
        .expect("run gateway")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn unknown_key_is_exit_78_naming_line_and_key() {
    let output = gateway(
        &[],
        Some("[server]\nlisten = \"127.0.0.1:0\"\nmax_conections = 5\n"),
    );
    assert_eq!(output.status.code(), Some(78));
    let message = stderr(&output);
    assert!(message.contains(":3:1: server"), "{message}");
    assert!(
        message.contains("unknown field `max_conections`"),
        "{message}"
    );
}

#[test]
fn bad_backend_lists_the_valid_ones() {
    let output = gateway(&[], Some("[runtime]\nbackend = \"glommio\"\n"));
    assert_eq!(output.status.code(), Some(78));
    let message = stderr(&output);
    assert!(message.contains(":2:11: runtime.backend"), "{message}");
    assert!(message.contains("expected `tokio` or `smol`"), "{message}");
}

#[test]
fn bad_values_are_exit_78() {
    for (text, key) in [
        (
            "[server]\nmax_header_bytes = 1024\n",
            "server.max_header_bytes",
        ),
        (
            "[upstream]\nurl = \"ftp://127.0.0.1/counter\"\n",
            "upstream.url",
        ),
        (
            "[upstream]\nrequest_timeout_ms = 0\n",
            "upstream.request_timeout_ms",
        ),
        ("[server]\nlisten = \"nowhere\"\n", "server.listen"),
        ("[runtime]\nworkers = -1\n", "runtime.workers"),
        ("[server\n", "(syntax)"),
    ] {
        let output = gateway(&[], Some(text));
        assert_eq!(output.status.code(), Some(78), "{text}");
        assert!(stderr(&output).contains(key), "{text}: {}", stderr(&output));
    }
}

#[test]
fn missing_file_says_where_it_looked() {
    let output = Command::new(common::gateway_binary())
        .args(["--config", "/nonexistent/gateway.toml"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(78));
    assert!(
        stderr(&output).contains("/nonexistent/gateway.toml"),
        "{}",
        stderr(&output)
    );

    let empty_dir = tempfile::tempdir().unwrap();
    let output = Command::new(common::gateway_binary())
        .current_dir(empty_dir.path())
        .env_remove("GATEWAY_CONFIG")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(78));
    assert!(
        stderr(&output).contains("config.toml"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn config_comes_from_the_environment_when_not_given() {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), "[runtime]\nbackend = \"smol\"\n").unwrap();
    let output = Command::new(common::gateway_binary())
        .arg("--check")
        .env("GATEWAY_CONFIG", file.path())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&output.stdout).contains("backend=smol"));
}

#[test]
fn check_prints_a_one_line_summary() {
    let output = gateway(&["--check"], Some("[runtime]\nworkers = 3\n"));
    assert_eq!(output.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(stdout.contains("backend=tokio workers=3"), "{stdout}");
}

#[test]
fn shipped_config_is_valid() {
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/../config.toml");
    let output = Command::new(common::gateway_binary())
        .args(["--check", "--config", shipped])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
}

#[test]
fn usage_error_is_exit_2_and_version_is_exit_0() {
    let output = gateway(&["--no-such-flag"], None);
    assert_eq!(output.status.code(), Some(2));
    let output = gateway(&["counter", "--backend", "glommio"], None);
    assert_eq!(output.status.code(), Some(2));
    let output = gateway(&["--version"], None);
    assert_eq!(output.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&output.stdout).starts_with("gateway "));
}

#[test]
fn address_in_use_is_exit_1() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let output = gateway(&[], Some(&format!("[server]\nlisten = \"{addr}\"\n")));
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains(&addr.to_string()),
        "{}",
        stderr(&output)
    );
}

#[test]
fn limits_and_url_rules_are_exit_78_also_for_check() {
    for (text, place) in [
        ("[runtime]\nworkers = 1025\n", ":2:11: runtime.workers"),
        (
            "[runtime]\nworkers = 9223372036854775807\n",
            ":2:11: runtime.workers",
        ),
        (
            "[server]\nmax_header_bytes = 18446744073709551615\n",
            ":2:20: server.max_header_bytes",
        ),
        (
            "[server]\nmax_connections = 18446744073709551615\n",
            ":2:19: server.max_connections",
        ),
        (
            "[upstream]\nmax_connections = 9223372036854775807\n",
            ":2:19: upstream.max_connections",
        ),
        (
            "[upstream]\nurl = \"http://127.0.0.1:99999/counter\"\n",
            ":2:7: upstream.url",
        ),
        ("[upstream]\nurl = \"http://:80/\"\n", ":2:7: upstream.url"),
        (
            "[upstream]\nurl = \"http://me:pw@127.0.0.1/\"\n",
            ":2:7: upstream.url",
        ),
        (
            "[upstream]\nurl = \"http://127.0.0.1/#x\"\n",
            ":2:7: upstream.url",
        ),
    ] {
        for args in [&[][..], &["--check"]] {
            let output = gateway(args, Some(text));
            assert_eq!(output.status.code(), Some(78), "{text} {args:?}");
            let message = stderr(&output);
            assert!(message.contains(place), "{text}: {message}");
        }
    }
}

#[test]
fn a_configuration_error_is_one_escaped_line() {
    let text = "[upstream]\nurl = \"http://127.0.0.1/x\\r\\n2026-01-01T00:00:00Z INFO forged\"\n";
    for args in [&[][..], &["--check"]] {
        let output = gateway(args, Some(text));
        assert_eq!(output.status.code(), Some(78));
        let message = stderr(&output);
        assert_eq!(message.lines().count(), 1, "{message}");
        assert!(message.contains(":2:7: upstream.url"), "{message}");
        assert!(
            message.contains(r"/x\r\n2026-01-01T00:00:00Z INFO forged"),
            "{message}"
        );
    }
    // An unknown variant: toml's own message quotes the value.
    let output = gateway(&[], Some("[runtime]\nbackend = \"smol\\nforged\"\n"));
    assert_eq!(output.status.code(), Some(78));
    let message = stderr(&output);
    assert_eq!(message.lines().count(), 1, "{message}");
    assert!(message.contains(r"`smol\nforged`"), "{message}");
    // And the file's own name.
    let output = gateway(&["--config", "/nonexistent/a\nb.toml"], None);
    assert_eq!(output.status.code(), Some(78));
    let message = stderr(&output);
    assert_eq!(message.lines().count(), 1, "{message}");
    assert!(message.contains(r"/nonexistent/a\nb.toml"), "{message}");
}

#[test]
fn counter_workers_are_bounded_like_the_config() {
    let output = gateway(&["--check", "counter", "--workers", "1025"], None);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("0..=1024"), "{}", stderr(&output));
    let output = gateway(&["--check", "counter", "--workers", "1024"], None);
    assert_eq!(output.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("workers=1024"), "{stdout}");
}

#[test]
fn counter_store_flags_must_fit_the_store() {
    for (args, flag) in [
        (&["--store", "postgres"][..], "--store"),
        (&["--store", "memory", "--path", "c"][..], "--path"),
        (&["--postgres-url", "postgres://h/db"][..], "--postgres-url"),
        (
            &[
                "--store",
                "postgres",
                "--postgres-url",
                "postgres://h:99999/db",
            ][..],
            "--postgres-url",
        ),
    ] {
        let output = gateway(&[&["--check", "counter"][..], args].concat(), None);
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        assert!(
            stderr(&output).contains(flag),
            "{args:?}: {}",
            stderr(&output)
        );
    }
    let output = gateway(
        &[
            "--check",
            "counter",
            "--store",
            "postgres",
            "--postgres-url",
            "postgres://gw:pw@h/db",
        ],
        None,
    );
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("store=postgres://gw@h:5432/db"), "{stdout}");
    assert!(
        !stdout.contains("pw"),
        "the password is not shown: {stdout}"
    );
}

/// A worker thread the OS refuses ends the start with exit 1 and a
/// message naming it, in both threading modes; tokio's multi-thread
/// runtime would panic (101 in this debug build, or a hang unwinding).
/// The refusal is made certain with `RUST_MIN_STACK`, which std (and so
/// tokio) reads for the stack of every thread it spawns: no address space
/// holds a 1 PiB stack, so each spawn fails at once, before the thread
/// exists. (An address-space or task limit fails somewhere in the middle,
/// and can fail a small allocation in a thread that did start instead.)
async fn refused_worker_threads_are_exit_1(backend: Backend) {
    let upstream = common::TestUpstream::closed_port().await;
    for threading in Threading::ALL.iter().copied() {
        let config = GatewayConfig::new(backend, upstream)
            .workers(4)
            .threading(threading)
            .render();
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), config).unwrap();
        let output = tokio::process::Command::new(common::gateway_binary())
            .arg("--config")
            .arg(file.path())
            .env("RUST_MIN_STACK", (1u64 << 50).to_string())
            .kill_on_drop(true)
            .output();
        let output = tokio::time::timeout(Duration::from_secs(30), output)
            .await
            .expect("the gateway exits")
            .expect("run gateway");
        let message = stderr(&output);
        assert_eq!(
            output.status.code(),
            Some(1),
            "{}: {message}",
            threading.name()
        );
        assert!(
            message.contains(&format!(
                "gateway: cannot start the {} runtime: cannot start worker thread 1 of 4",
                backend.name()
            )),
            "{}: {message}",
            threading.name()
        );
    }
}

both_backends!(refused_worker_threads_are_exit_1);

/// Only a regular file is read as the configuration, and only up to 1 MiB:
/// a FIFO would block the start for ever, `/dev/zero` would fill memory.
#[test]
fn a_configuration_that_is_not_a_small_regular_file_is_exit_78() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo.toml");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let big = dir.path().join("big.toml");
    std::fs::write(&big, "#".repeat(2 << 20)).unwrap();
    for (path, why) in [
        (std::path::Path::new("/dev/zero"), "not a regular file"),
        (fifo.as_path(), "not a regular file"),
        (dir.path(), "not a regular file"),
        (big.as_path(), "larger than 1048576 bytes"),
    ] {
        let output = Command::new(common::gateway_binary())
            .arg("--check")
            .arg("--config")
            .arg(path)
            .output()
            .expect("run gateway");
        assert_eq!(output.status.code(), Some(78), "{}", path.display());
        let message = stderr(&output);
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(message.contains(why), "{message}");
    }
}
