//! The PostgreSQL store as production reaches a database on another host:
//! over TLS, with libpq's `sslmode`s, and with a password from libpq's
//! password file rather than the URL. The database here takes TCP
//! connections only as `hostssl … scram-sha-256`. Skipped, saying so,
//! where PostgreSQL is not installed.

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;
use std::process::Command;

use common::postgres::Postgres;
use common::tls::{SERVER_NAMES, TestCa};
use common::{Backend, Client, Process, counter_tally};
use http::StatusCode;

const PASSWORD: &str = "s3cret:with\\colon";

/// A database that takes only TLS and passwords, the CA that signed its
/// certificate (as a file), and a password file for the counter.
struct SecureDatabase {
    db: Postgres,
    folder: tempfile::TempDir,
    ca_file: PathBuf,
    passfile: PathBuf,
}

impl SecureDatabase {
    /// With a certificate for `names`.
    fn start(names: &[&str]) -> Option<Self> {
        let db = Postgres::start()?;
        let ca = TestCa::new("database CA");
        db.require_tls_and_passwords(&ca.leaf(names), PASSWORD);
        let folder = tempfile::tempdir().unwrap();
        let ca_file = ca.write(folder.path(), "database-ca.pem");
        let passfile = folder.path().join("pgpass");
        // libpq's escapes: the password's `:` and `\`.
        let escaped = PASSWORD.replace('\\', "\\\\").replace(':', "\\:");
        std::fs::write(
            &passfile,
            format!(
                "# the counter's\nother.host:*:*:*:wrong\n127.0.0.1:{}:postgres:gateway:{escaped}\n",
                db.port
            ),
        )
        .unwrap();
        std::fs::set_permissions(&passfile, std::fs::Permissions::from_mode(0o600)).unwrap();
        Some(Self {
            db,
            folder,
            ca_file,
            passfile,
        })
    }

    /// The URL with `parameters`, and no password.
    fn url(&self, parameters: &str) -> String {
        format!(
            "postgres://gateway@127.0.0.1:{}/postgres?{parameters}",
            self.db.port
        )
    }

    /// `sslmode=verify-full` against the database's CA, the password from
    /// the password file.
    fn verified_url(&self) -> String {
        self.url(&format!(
            "sslmode=verify-full&sslrootcert={}&passfile={}",
            self.ca_file.display(),
            self.passfile.display()
        ))
    }
}

fn counter_command(backend: Backend, url: &str) -> Command {
    let mut command = common::counter_command(backend);
    command.args(["--store", "postgres", "--postgres-url", url]);
    command.env_remove("PGPASSFILE");
    command
}

fn start_counter(command: Command) -> Process {
    Process::start_command(command, 1)
}

/// Runs a counter that must fail to start: its stderr.
fn failed_start(mut command: Command) -> String {
    let out = command.output().expect("run the counter");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    stderr
}

async fn post(counter: &Process, visits: u64) {
    let mut client = Client::connect(counter.addr("counter")).await;
    for _ in 0..visits {
        assert_eq!(
            client.post("/counter").await.status,
            StatusCode::OK,
            "{}",
            counter.log_text()
        );
    }
}

/// The case: `verify-full`, a CA file, a password file; the
/// sessions are encrypted and the count is exact. A second counter
/// finds the password file through `PGPASSFILE` and adds to the same
/// count.
async fn verify_full_with_a_ca_file_and_a_password_file_counts_exactly(backend: Backend) {
    let Some(secure) = SecureDatabase::start(SERVER_NAMES) else {
        return;
    };
    let first = start_counter(counter_command(backend, &secure.verified_url()));
    post(&first, 25).await;
    assert!(secure.db.counter_sessions_encrypted());

    let url = secure.url(&format!(
        "sslmode=verify-full&sslrootcert={}",
        secure.ca_file.display()
    ));
    let mut command = counter_command(backend, &url);
    command.env("PGPASSFILE", &secure.passfile);
    let second = start_counter(command);
    post(&second, 15).await;
    assert_eq!(counter_tally(first.addr("counter")).await, 40);
    assert_eq!(secure.db.total(), 40);
    assert!(secure.db.counter_sessions_encrypted());
}

/// A certificate from a CA other than the one in `sslrootcert` stops
/// the start, and the message names the certificate and why: in
/// `verify-full`, `verify-ca`, and `require`, which checks the chain
/// where a CA file is given, as libpq's does.
async fn a_certificate_from_another_ca_stops_the_start_naming_it(backend: Backend) {
    let Some(secure) = SecureDatabase::start(SERVER_NAMES) else {
        return;
    };
    let stranger = TestCa::new("some other CA").write(secure.folder.path(), "other-ca.pem");
    for mode in ["verify-full", "verify-ca", "require"] {
        let url = secure.url(&format!(
            "sslmode={mode}&sslrootcert={}&passfile={}",
            stranger.display(),
            secure.passfile.display()
        ));
        let stderr = failed_start(counter_command(backend, &url));
        assert!(
            stderr.contains("UnknownIssuer")
                && stderr.contains("issuer \"CN=database CA\"")
                && stderr.contains(&format!("sslrootcert={}", stranger.display()))
                && stderr.contains(&format!("sslmode={mode}")),
            "{stderr}"
        );
    }
}

/// `verify-ca` checks the chain and not the name; `verify-full` both.
async fn verify_ca_takes_a_certificate_for_another_name_and_verify_full_does_not(backend: Backend) {
    let Some(secure) = SecureDatabase::start(&["db.example"]) else {
        return;
    };
    let with_mode = |mode: &str| {
        secure.url(&format!(
            "sslmode={mode}&sslrootcert={}&passfile={}",
            secure.ca_file.display(),
            secure.passfile.display()
        ))
    };
    let counter = start_counter(counter_command(backend, &with_mode("verify-ca")));
    post(&counter, 3).await;
    assert!(secure.db.counter_sessions_encrypted());
    let stderr = failed_start(counter_command(backend, &with_mode("verify-full")));
    assert!(stderr.contains("not valid for name"), "{stderr}");
}

/// The weaker modes, as libpq has them. Against a server that takes TLS
/// only: `require` and `prefer` connect over TLS without verifying;
/// `allow` is refused without TLS, then tries with it; `disable` is
/// refused, a failed start naming the server's reason. Against one that
/// takes both: `allow` and `disable` connect without TLS, `prefer` with.
async fn the_weaker_modes_behave_as_libpqs(backend: Backend) {
    let Some(secure) = SecureDatabase::start(SERVER_NAMES) else {
        return;
    };
    let passfile = secure.passfile.display();
    let url = |mode: &str| secure.url(&format!("sslmode={mode}&passfile={passfile}"));
    let sessions = async |mode: &str| {
        let counter = start_counter(counter_command(backend, &url(mode)));
        post(&counter, 2).await;
        secure.db.counter_sessions()
    };
    for mode in ["require", "prefer", "allow"] {
        assert_eq!(sessions(mode).await, (1, 1), "sslmode={mode}");
    }
    let stderr = failed_start(counter_command(backend, &url("disable")));
    assert!(stderr.contains("no pg_hba.conf entry"), "{stderr}");

    secure.db.allow_plaintext_too();
    assert_eq!(sessions("allow").await, (1, 0), "allow: plaintext first");
    assert_eq!(sessions("disable").await, (1, 0));
    assert_eq!(
        sessions("prefer").await,
        (1, 1),
        "prefer: TLS where offered"
    );
    assert_eq!(secure.db.total(), 12);
}

/// A password file that its group or others may read is refused, as
/// libpq refuses it, naming the file and its mode; a password in the URL
/// still works without one.
async fn a_password_file_others_may_read_is_refused(backend: Backend) {
    let Some(secure) = SecureDatabase::start(SERVER_NAMES) else {
        return;
    };
    std::fs::set_permissions(&secure.passfile, std::fs::Permissions::from_mode(0o644)).unwrap();
    let stderr = failed_start(counter_command(backend, &secure.verified_url()));
    assert!(
        stderr.contains(&secure.passfile.display().to_string()) && stderr.contains("0644"),
        "{stderr}"
    );

    let password: String = PASSWORD.bytes().map(|b| format!("%{b:02X}")).collect();
    let url = format!(
        "postgres://gateway:{password}@127.0.0.1:{}/postgres?sslmode=verify-full&sslrootcert={}",
        secure.db.port,
        secure.ca_file.display()
    );
    let counter = start_counter(counter_command(backend, &url));
    post(&counter, 1).await;
    assert_eq!(secure.db.total(), 1);
}

/// A server without TLS: `require` and stricter stop the start rather
/// than go on in plaintext; `prefer`, libpq's default, goes on without.
async fn a_server_without_tls_is_no_fallback_for_require(backend: Backend) {
    let Some(db) = Postgres::start() else { return };
    let ca = TestCa::new("database CA").write(db.folder(), "ca.pem");
    for mode in ["require", "verify-ca", "verify-full"] {
        let url = format!(
            "postgres://gateway@127.0.0.1:{}/postgres?sslmode={mode}&sslrootcert={}",
            db.port,
            ca.display()
        );
        let stderr = failed_start(counter_command(backend, &url));
        assert!(stderr.contains("does not support TLS"), "{mode}: {stderr}");
    }
    let url = format!(
        "postgres://gateway@127.0.0.1:{}/postgres?sslmode=prefer",
        db.port
    );
    let counter = start_counter(counter_command(backend, &url));
    post(&counter, 1).await;
    assert_eq!(db.counter_sessions(), (1, 0));
}

both_backends!(
    a_server_without_tls_is_no_fallback_for_require,
    verify_full_with_a_ca_file_and_a_password_file_counts_exactly,
    a_certificate_from_another_ca_stops_the_start_naming_it,
    verify_ca_takes_a_certificate_for_another_name_and_verify_full_does_not,
    the_weaker_modes_behave_as_libpqs,
    a_password_file_others_may_read_is_refused,
);
