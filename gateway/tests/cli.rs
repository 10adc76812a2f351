//! README, "Command line" and "Configuration": the command line, configuration errors and exit statuses
//! (the TLS settings' among them).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::tls::{SERVER_NAMES, TestCa, server_lines};
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
    assert!(
        stdout.contains(
            " http2 max_streams=128 stream_window=16384 connection_window=65535 max_header_list=16384"
        ),
        "the HTTP/2 limits: {stdout}"
    );
    let output = gateway(&["--check"], Some("[server]\nhttp2 = false\n"));
    assert!(String::from_utf8_lossy(&output.stdout).contains(" http2=off"));
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
            "[server]\nhttp2_max_streams = 0\n",
            ":2:21: server.http2_max_streams",
        ),
        (
            "[server]\nhttp2_stream_window_bytes = 4294967296\n",
            ":2:29: server.http2_stream_window_bytes",
        ),
        (
            "[server]\nhttp2_connection_window_bytes = 1000\n",
            ":2:33: server.http2_connection_window_bytes",
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

/// What a configuration error case writes and expects: the config's
/// extra `[server]` and `[upstream]` lines, the upstream URL when not the
/// plain default, the key the error names and the path it names.
struct BadConfig {
    case: &'static str,
    server: String,
    upstream: String,
    url: Option<String>,
    keys: &'static [&'static str],
    /// Any of these paths (as text) in the message; `None`: the config
    /// file's own path.
    paths: Option<Vec<PathBuf>>,
}

impl BadConfig {
    /// A case in `[server]` alone.
    fn server(
        case: &'static str,
        server: String,
        keys: &'static [&'static str],
        paths: Option<Vec<PathBuf>>,
    ) -> Self {
        Self {
            case,
            server,
            upstream: String::new(),
            url: None,
            keys,
            paths,
        }
    }
}

/// The TLS settings' configuration errors are read before any runtime
/// starts, by code the backends do not share in, so the table runs once, on
/// the default backend, and as a plain start only: that `--check` exits the
/// same way is shown for every kind of configuration error by
/// `limits_and_url_rules_are_exit_78_also_for_check`, and the well
/// configured files pass `--check` below.
#[tokio::test]
async fn tls_config_errors_are_exit_78_naming_file_and_key() {
    let backend = Backend::default();
    let folder = tempfile::tempdir().unwrap();
    let dir = folder.path();
    let ca = TestCa::new("test CA");
    let leaf = ca.leaf(SERVER_NAMES);
    let (cert, key) = leaf.write(dir, "good");
    let other_key = ca.leaf(SERVER_NAMES).write(dir, "other").1;
    let missing = dir.join("missing.pem");
    let key_only = dir.join("key-only.pem");
    std::fs::write(&key_only, leaf.key_pem()).unwrap();
    let cert_only = dir.join("cert-only.pem");
    std::fs::write(&cert_only, &leaf.pem).unwrap();
    let garbage = dir.join("garbage.pem");
    std::fs::write(&garbage, "not PEM at all\n").unwrap();
    let ca_file = ca.write(dir, "ca.pem");
    let a_folder = dir.join("a-folder");
    std::fs::create_dir(&a_folder).unwrap();
    let https = "https://127.0.0.1:9/counter".to_owned();

    // The same files, well configured, pass the check.
    let good = dir.join("good.toml");
    let mut config = GatewayConfig::new(backend, "127.0.0.1:9".parse().unwrap())
        .server(&server_lines(&cert, &key))
        .upstream(&format!("tls_ca = {ca_file:?}"));
    config.upstream = https.clone();
    std::fs::write(&good, config.render()).unwrap();
    let output = tokio::process::Command::new(common::gateway_binary())
        .arg("--check")
        .arg("--config")
        .arg(&good)
        .output()
        .await
        .expect("run gateway --check");
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let tls = |c: &Path, k: &Path| server_lines(c, k);
    let cases = [
        BadConfig::server(
            "missing certificate file",
            tls(&missing, &key),
            &["server.tls_cert"],
            Some(vec![missing.clone()]),
        ),
        BadConfig::server(
            "missing key file",
            tls(&cert, &missing),
            &["server.tls_key"],
            Some(vec![missing.clone()]),
        ),
        BadConfig::server(
            "unreadable key file (a folder)",
            tls(&cert, &a_folder),
            &["server.tls_key"],
            Some(vec![a_folder.clone()]),
        ),
        BadConfig::server(
            "missing certificate file, relative to the config's folder",
            format!("tls_cert = \"nowhere.crt\"\ntls_key = {key:?}"),
            &["server.tls_cert"],
            Some(vec![dir.join("nowhere.crt")]),
        ),
        BadConfig::server(
            "certificate file with no certificate",
            tls(&key_only, &key),
            &["server.tls_cert"],
            Some(vec![key_only.clone()]),
        ),
        BadConfig::server(
            "key file with no key",
            tls(&cert, &cert_only),
            &["server.tls_key"],
            Some(vec![cert_only.clone()]),
        ),
        BadConfig::server(
            "garbage key file",
            tls(&cert, &garbage),
            &["server.tls_key"],
            Some(vec![garbage.clone()]),
        ),
        BadConfig::server(
            "key not matching the certificate",
            tls(&cert, &other_key),
            &["server.tls_key", "server.tls_cert"],
            Some(vec![other_key.clone(), cert.clone()]),
        ),
        BadConfig::server(
            "tls_cert without tls_key",
            format!("tls_cert = {cert:?}"),
            &["tls_key"],
            None,
        ),
        BadConfig::server(
            "tls_key without tls_cert",
            format!("tls_key = {key:?}"),
            &["tls_cert"],
            None,
        ),
        BadConfig {
            case: "missing CA file",
            server: String::new(),
            upstream: format!("tls_ca = {missing:?}"),
            url: Some(https.clone()),
            keys: &["upstream.tls_ca"],
            paths: Some(vec![missing.clone()]),
        },
        BadConfig {
            case: "CA file with no certificate",
            server: String::new(),
            upstream: format!("tls_ca = {garbage:?}"),
            url: Some(https.clone()),
            keys: &["upstream.tls_ca"],
            paths: Some(vec![garbage.clone()]),
        },
        BadConfig {
            case: "tls_ca with an http:// url",
            server: String::new(),
            upstream: format!("tls_ca = {ca_file:?}"),
            url: None,
            keys: &["upstream.tls_ca"],
            paths: None,
        },
    ];
    for bad in cases {
        let case = bad.case;
        let mut config = GatewayConfig::new(backend, "127.0.0.1:9".parse().unwrap());
        if !bad.server.is_empty() {
            config = config.server(&bad.server);
        }
        if !bad.upstream.is_empty() {
            config = config.upstream(&bad.upstream);
        }
        if let Some(url) = bad.url {
            config.upstream = url;
        }
        let file = dir.join("gateway.toml");
        std::fs::write(&file, config.render()).unwrap();
        let paths = bad.paths.unwrap_or_else(|| vec![file.clone()]);
        let line = common::refused_config_line(&file, false, bad.keys, case).await;
        assert!(
            paths
                .iter()
                .any(|path| line.contains(path.to_str().unwrap())),
            "{case}: the line does not name {paths:?}: {line}"
        );
        eprintln!("{case}: {line}");
    }
}
