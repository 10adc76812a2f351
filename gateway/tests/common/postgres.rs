//! A real PostgreSQL server for the tests: a cluster of its own in a
//! temporary folder, on a free loopback port, run as a non-root user (the
//! `postgres` account when the tests run as root, as CI does), stopped and
//! removed on drop. Where PostgreSQL is not installed the tests that need
//! it say so and skip, unless `GATEWAY_REQUIRE` names `postgres` (see
//! [`super::require`]): then they fail.

use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

pub struct Postgres {
    folder: tempfile::TempDir,
    bin: PathBuf,
    /// The account the server runs as, when the tests run as root.
    account: Option<(u32, u32)>,
    /// The network namespace it runs in, if not the tests'.
    namespace: Option<String>,
    pub addr: Ipv4Addr,
    pub port: u16,
}

/// The newest installed PostgreSQL's programs (`initdb`, `pg_ctl`).
fn find_bin() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("GATEWAY_TEST_PG_BIN") {
        let dir = PathBuf::from(dir);
        return dir.join("initdb").exists().then_some(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

fn id(flag: &str, user: &str) -> Option<u32> {
    let out = Command::new("id").args([flag, user]).output().ok()?;
    String::from_utf8(out.stdout).ok()?.trim().parse().ok()
}

impl Postgres {
    /// A fresh server on loopback, or `None` (after saying why) when
    /// PostgreSQL is not installed and the run does not require it.
    pub fn start() -> Option<Self> {
        Self::start_in(None, Ipv4Addr::LOCALHOST)
    }

    /// A fresh server in network namespace `namespace` (when given),
    /// listening on `addr`.
    pub fn start_in(namespace: Option<&str>, addr: Ipv4Addr) -> Option<Self> {
        let Some(bin) = find_bin() else {
            let why = "PostgreSQL is not installed (no initdb in /usr/lib/postgresql/*/bin \
                       or $GATEWAY_TEST_PG_BIN; `apt-get install postgresql`)";
            super::require::skip_for_want_of("postgres", why);
            return None;
        };
        let folder = tempfile::tempdir().expect("a folder for the cluster");
        let account = if rustix::process::geteuid().is_root() {
            let user = ["postgres", "nobody"]
                .into_iter()
                .find(|user| id("-u", user).is_some())
                .expect("a non-root account to run PostgreSQL as (postgres or nobody)");
            let account = (id("-u", user).unwrap(), id("-g", user).unwrap());
            std::os::unix::fs::chown(folder.path(), Some(account.0), Some(account.1))
                .expect("give the cluster's folder to its account");
            Some(account)
        } else {
            None
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let server = Self {
            folder,
            bin,
            account,
            namespace: namespace.map(str::to_owned),
            addr,
            port,
        };
        let data = server.data();
        server.run(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "gateway",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
            ],
        );
        if addr != Ipv4Addr::LOCALHOST {
            // initdb trusts loopback only; these hosts are on the bridge.
            use std::io::Write;
            std::fs::OpenOptions::new()
                .append(true)
                .open(data.join("pg_hba.conf"))
                .and_then(|mut hba| hba.write_all(b"host all all samenet trust\n"))
                .expect("trust the test network");
        }
        server.start_server();
        Some(server)
    }

    fn data(&self) -> PathBuf {
        self.folder.path().join("data")
    }

    /// `program` of PostgreSQL's, to be run as the server's account in its
    /// namespace.
    fn command(&self, program: &str) -> Command {
        let program = self.bin.join(program);
        let mut command = match (&self.namespace, self.account) {
            (Some(namespace), Some((uid, gid))) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", namespace, "setpriv"]);
                command
                    .arg(format!("--reuid={uid}"))
                    .arg(format!("--regid={gid}"));
                command.arg("--clear-groups").arg(program);
                command
            }
            (_, account) => {
                let mut command = Command::new(program);
                if let Some((uid, gid)) = account {
                    command.uid(uid).gid(gid);
                }
                command
            }
        };
        command.current_dir(self.folder.path());
        command
    }

    fn run(&self, program: &str, args: &[&str]) {
        let mut command = self.command(program);
        command.args(args);
        let out = command
            .output()
            .unwrap_or_else(|e| panic!("run {program}: {e}"));
        assert!(
            out.status.success(),
            "{program} {args:?} failed: {}{}\nserver log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.folder.path().join("server.log")).unwrap_or_default()
        );
    }

    /// The URL the counter is given.
    pub fn url(&self) -> String {
        self.url_as("gateway")
    }

    /// The URL for logging in as `role` (trusted, like every role here).
    pub fn url_as(&self, role: &str) -> String {
        format!("postgres://{role}@{}:{}/postgres", self.addr, self.port)
    }

    /// Ends every counter's session from another session, as an operator's
    /// `pg_terminate_backend` does, and returns once they are gone; how
    /// many there were.
    pub fn terminate_counter_sessions(&self) -> u64 {
        let ended = self.query(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 5000)) \
             FROM pg_stat_activity WHERE application_name = 'gateway counter'",
        );
        ended
            .parse()
            .unwrap_or_else(|_| panic!("a number of sessions, not {ended:?}"))
    }

    /// Starts the server and returns once it accepts connections.
    pub fn start_server(&self) -> Instant {
        let data = self.data();
        let options = format!(
            "-p {} -k {} -c listen_addresses={}",
            self.port,
            self.folder.path().display(),
            self.addr
        );
        let log = self.folder.path().join("server.log");
        self.run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap(),
                "-o",
                &options,
                "-l",
                log.to_str().unwrap(),
                "-w",
                "start",
            ],
        );
        Instant::now()
    }

    /// Stops the server the way an operator's restart does (`-m fast`:
    /// sessions are ended, their open transactions rolled back).
    pub fn stop_server(&self) {
        let data = self.data();
        self.run(
            "pg_ctl",
            &["-D", data.to_str().unwrap(), "-m", "fast", "-w", "stop"],
        );
    }

    /// What `psql` is pointed at: the server's Unix socket, which the
    /// tests' own sessions use whatever TCP clients must do.
    fn socket_url(&self) -> String {
        format!(
            "host={} port={} user=gateway dbname=postgres",
            self.folder.path().display(),
            self.port
        )
    }

    /// Runs `sql` with `psql` and returns what it printed (unaligned,
    /// tuples only).
    pub fn query(&self, sql: &str) -> String {
        let mut command = Command::new(self.bin.join("psql"));
        command.args([
            "-X",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
            &self.socket_url(),
        ]);
        let out = command.output().expect("run psql");
        assert!(
            out.status.success(),
            "psql: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Starts `psql` running `sql` in the background.
    pub fn spawn_query(&self, sql: &str) -> std::process::Child {
        Command::new(self.bin.join("psql"))
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .arg(self.socket_url())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("run psql")
    }

    /// From now on, takes TCP connections only over TLS, with `leaf` as
    /// its certificate, and only with a password (`hostssl …
    /// scram-sha-256`), `gateway`'s being `password`; its Unix socket
    /// stays trusted, for the tests' own sessions. Restarts the server.
    pub fn require_tls_and_passwords(&self, leaf: &super::tls::Leaf, password: &str) {
        use std::io::Write as _;
        use std::os::unix::fs::PermissionsExt as _;
        let data = self.data();
        let (cert, key) = leaf.write(&data, "server");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        if let Some((uid, gid)) = self.account {
            for file in [&cert, &key] {
                std::os::unix::fs::chown(file, Some(uid), Some(gid)).unwrap();
            }
        }
        std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .and_then(|mut conf| {
                conf.write_all(
                    b"ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n\
                      password_encryption = 'scram-sha-256'\n",
                )
            })
            .expect("turn TLS on");
        self.query(&format!("ALTER ROLE gateway PASSWORD '{password}'"));
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 scram-sha-256\n",
        )
        .expect("write pg_hba.conf");
        self.stop_server();
        self.start_server();
    }

    /// Also takes TCP connections without TLS (`hostnossl …
    /// scram-sha-256`), as well as with it; reloads the server.
    pub fn allow_plaintext_too(&self) {
        use std::io::Write as _;
        let data = self.data();
        std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("pg_hba.conf"))
            .and_then(|mut hba| hba.write_all(b"hostnossl all all 127.0.0.1/32 scram-sha-256\n"))
            .expect("allow plaintext");
        self.run("pg_ctl", &["-D", data.to_str().unwrap(), "reload"]);
        // A reload is applied asynchronously; new sessions read pg_hba.conf.
        std::thread::sleep(std::time::Duration::from_millis(300));
    }

    /// The counter's sessions: how many, and how many of them are over TLS.
    pub fn counter_sessions(&self) -> (u64, u64) {
        let counts = self.query(
            "SELECT count(*), count(*) FILTER (WHERE s.ssl) FROM pg_stat_ssl s \
             JOIN pg_stat_activity a USING (pid) WHERE a.application_name = 'gateway counter'",
        );
        let parse = |n: &str| {
            n.parse()
                .unwrap_or_else(|_| panic!("counts, not {counts:?}"))
        };
        let (all, encrypted) = counts
            .split_once('|')
            .unwrap_or_else(|| panic!("two counts, not {counts:?}"));
        (parse(all), parse(encrypted))
    }

    /// Whether every session of the counter's is over TLS (and there is one).
    pub fn counter_sessions_encrypted(&self) -> bool {
        let (all, encrypted) = self.counter_sessions();
        all > 0 && encrypted == all
    }

    /// The count in the database: the base row and every writer's part.
    pub fn total(&self) -> u64 {
        let total = self.query(
            "SELECT c.total + (SELECT coalesce(sum(total), 0) FROM gateway_counter_parts) \
             FROM gateway_counter c",
        );
        total
            .parse()
            .unwrap_or_else(|_| panic!("a total, not {total:?}"))
    }

    pub fn folder(&self) -> &Path {
        self.folder.path()
    }

    /// Stops the postmaster (SIGSTOP) until the guard is dropped: a hung
    /// database host, whose kernel still completes new connections and
    /// acknowledges what they send, and never answers. Sessions already
    /// open go on: end the counter's first to make it connect again.
    pub fn freeze(&self) -> Frozen {
        let pid = std::fs::read_to_string(self.data().join("postmaster.pid"))
            .expect("read postmaster.pid");
        let pid = pid
            .lines()
            .next()
            .and_then(|line| line.trim().parse().ok())
            .and_then(rustix::process::Pid::from_raw)
            .unwrap_or_else(|| panic!("a postmaster pid in {pid:?}"));
        rustix::process::kill_process(pid, rustix::process::Signal::STOP)
            .expect("stop the postmaster");
        Frozen { pid }
    }
}

/// A stopped postmaster, continued (SIGCONT) on drop, a failed test's
/// included, so that none is left behind and the server can be stopped.
/// Dropped before its [`Postgres`] where declared after it.
pub struct Frozen {
    pid: rustix::process::Pid,
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = rustix::process::kill_process(self.pid, rustix::process::Signal::CONT);
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.data();
        let mut command = Command::new(self.bin.join("pg_ctl"));
        command.args([
            "-D",
            data.to_str().unwrap_or_default(),
            "-m",
            "immediate",
            "stop",
        ]);
        if let Some((uid, gid)) = self.account {
            command.uid(uid).gid(gid);
        }
        let _ = command.output();
    }
}
