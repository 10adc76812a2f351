//! A connection to the database: made on a thread of its own and waited
//! for, with libpq's `sslmode` and password file, looked at for a close
//! by the server before use, and what its errors say.

use std::hash::BuildHasher as _;
use std::io;
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use postgres::config::LoadBalanceHosts;
use postgres::fallible_iterator::FallibleIterator as _;
use postgres::{Client, NoTls, Statement};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::LOOK_AFTER_IDLE;
use super::passfile;
use super::schema::{COMMIT_BATCH, limits, prepare};
use super::url::{Database, RootCert, SslMode, Target, for_target, targets};
use crate::tls::{DatabaseTls, DatabaseVerification};

/// Why a connection could not be readied, or a read failed.
#[derive(Debug)]
pub(super) enum Failure {
    /// The connection's or the server's error.
    Postgres(postgres::Error),
    /// An answer that is not what this store's query gives.
    Unreadable(io::Error),
    /// No connection, and nothing the server said: an attempt with no
    /// answer yet, or none could be made. As for an unreachable database.
    Unconnected(String),
    /// A connection that had to be TLS was not: the server offers none,
    /// or its certificate did not verify. As for a wrong password.
    Tls(String),
    /// The password file could not be used. As for a wrong password.
    Passfile(String),
}

impl From<postgres::Error> for Failure {
    fn from(error: postgres::Error) -> Self {
        Self::Postgres(error)
    }
}

impl From<io::Error> for Failure {
    fn from(error: io::Error) -> Self {
        Self::Unreadable(error)
    }
}

impl Failure {
    pub(super) fn explain(&self) -> String {
        match self {
            // Through `refusal`, which says what to do where the tables
            // are gone: a new connection prepares the commit on them.
            Self::Postgres(error) => refusal(error).to_string(),
            Self::Unreadable(error) => error.to_string(),
            Self::Unconnected(why) | Self::Tls(why) | Self::Passfile(why) => why.clone(),
        }
    }

    /// Whether this says "not now" rather than "no": at start, waited out
    /// like an unreachable database (see [`transient`]).
    pub(super) fn unreachable(&self) -> bool {
        match self {
            Self::Postgres(error) => error.as_db_error().is_none() || transient(error),
            Self::Unreadable(_) | Self::Tls(_) | Self::Passfile(_) => false,
            Self::Unconnected(_) => true,
        }
    }
}

/// A connection being made on a thread of its own.
pub(super) struct Attempt {
    pub(super) started: Instant,
    /// Whether it looks for the tables too.
    pub(super) prepares: bool,
    /// The connection, with when it was ready, or why there is none.
    pub(super) answer: mpsc::Receiver<Result<(Session, Instant), Failure>>,
}

impl Attempt {
    /// Starts connecting with `connector`; with `writer`, the tables are
    /// looked for too (see [`prepare`]).
    pub(super) fn start(connector: &Arc<Connector>, writer: Option<&str>) -> Result<Self, Failure> {
        let (connector, writer) = (connector.clone(), writer.map(str::to_owned));
        let prepares = writer.is_some();
        let (send, answer) = mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("gateway-pg-connect".to_owned())
            .spawn(move || {
                let made = set_up(&connector, writer.as_deref());
                // With no one left to take it (the process is ending), the
                // connection closes here.
                let _ = send.send(made.map(|client| (client, Instant::now())));
            })
            .map_err(|error| {
                Failure::Unconnected(format!(
                    "cannot start a thread to connect to the database: {error}"
                ))
            })?;
        Ok(Self {
            started: Instant::now(),
            prepares,
            answer,
        })
    }
}

/// A connection and the statement its batches are committed with.
pub(super) struct Session {
    pub(super) client: Client,
    /// [`COMMIT_BATCH`], prepared on this connection.
    pub(super) commit: Statement,
}

/// A new connection, with its session's limits set, with `writer` the
/// tables looked for, and the commit's statement prepared: everything
/// that waits on the server before a connection can take a batch.
pub(super) fn set_up(connector: &Connector, writer: Option<&str>) -> Result<Session, Failure> {
    let mut client = connector.connect()?;
    client.batch_execute(&limits())?;
    if let Some(writer) = writer {
        prepare(&mut client, writer)?;
    }
    let commit = client.prepare(COMMIT_BATCH)?;
    Ok(Session { client, commit })
}

/// How the store connects: the database, and the TLS its `sslmode` may use.
pub(super) struct Connector {
    pub(super) database: Database,
    /// None where the mode never uses TLS.
    tls: Option<DatabaseTls>,
}

impl Connector {
    /// Reads what `database`'s TLS needs (the CA file, or the system's
    /// roots): an error names what could not be read.
    pub(super) fn new(database: Database) -> io::Result<Self> {
        let verification = match (database.ssl_mode, &database.root_cert) {
            (SslMode::Disable, _) => None,
            (SslMode::VerifyFull, _) => Some(DatabaseVerification::ChainAndName),
            (SslMode::VerifyCa, _) => Some(DatabaseVerification::Chain),
            // libpq verifies the chain in these modes too where a CA
            // file is given.
            (_, RootCert::File(_)) => Some(DatabaseVerification::Chain),
            (_, _) => Some(DatabaseVerification::None),
        };
        let tls = match verification {
            None => None,
            Some(verification) => {
                let roots = match (verification, &database.root_cert) {
                    (DatabaseVerification::None, _) => None,
                    (_, RootCert::File(path)) => Some(crate::tls::roots(Some(path))),
                    (_, RootCert::Absent | RootCert::System) => Some(crate::tls::roots(None)),
                };
                let roots = roots
                    .transpose()
                    .map_err(|error| io::Error::other(format!("sslrootcert: {error}")))?;
                Some(DatabaseTls::new(verification, roots).map_err(io::Error::other)?)
            }
        };
        Ok(Self { database, tls })
    }

    /// A connection to the first host that takes one, in the order the
    /// configuration gives (shuffled with `load_balance_hosts=random`),
    /// each tried as libpq tries it: see [`Self::connect_to`].
    fn connect(&self) -> Result<Client, Failure> {
        let mut hosts = targets(&self.database.config);
        if self.database.config.get_load_balance_hosts() == LoadBalanceHosts::Random {
            let random = std::collections::hash_map::RandomState::new();
            hosts.sort_by_cached_key(|target| random.hash_one(target.host_name()));
        }
        let mut failure = Failure::Unconnected("the database URL names no host".to_owned());
        for target in &hosts {
            match self.connect_to(target) {
                Ok(client) => return Ok(client),
                Err(failed) => failure = failed,
            }
        }
        Err(failure)
    }

    /// A connection to `target`, with its password from the password
    /// file where the URL has none, and TLS as libpq's `sslmode` says:
    /// never over a Unix socket; `allow` tries without TLS, then with it
    /// where the server refused; `prefer` tries with TLS where the server
    /// offers it, then without it where that failed; the rest insist.
    fn connect_to(&self, target: &Target) -> Result<Client, Failure> {
        let mut config = for_target(&self.database.config, target);
        if config.get_password().is_none()
            && let Some(password) = self.password_for(target)?
        {
            config.password(password);
        }
        let plain = |config: &mut postgres::Config| {
            config.ssl_mode(postgres::config::SslMode::Disable);
            config.connect(NoTls).map_err(Failure::from)
        };
        let Some(tls) = self.tls.as_ref().filter(|_| !target.is_unix()) else {
            return plain(&mut config);
        };
        let secure = |config: &mut postgres::Config, mode| {
            tls.take_rejected();
            config.ssl_mode(mode);
            config
                .connect(MakeRustlsConnect::new(tls.config().clone()))
                .map_err(Failure::from)
        };
        use postgres::config::SslMode as Client;
        match self.database.ssl_mode {
            SslMode::Disable => plain(&mut config),
            SslMode::Allow => match plain(&mut config) {
                Err(Failure::Postgres(error)) if error.as_db_error().is_some() => {
                    secure(&mut config, Client::Require)
                }
                made => made,
            },
            SslMode::Prefer => secure(&mut config, Client::Prefer).or_else(|_| plain(&mut config)),
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                secure(&mut config, Client::Require)
                    .map_err(|failure| self.explain_tls(target, tls, failure))
            }
        }
    }

    /// The password file's password for `target`, if it has one.
    fn password_for(&self, target: &Target) -> Result<Option<String>, Failure> {
        let config = &self.database.config;
        let Some(user) = config.get_user() else {
            return Ok(None);
        };
        let Some(file) = passfile::locate_from_environment(
            self.database
                .passfile
                .as_deref()
                .and_then(std::path::Path::to_str),
        ) else {
            return Ok(None);
        };
        let database = config.get_dbname().unwrap_or(user);
        passfile::lookup(&file, &target.host_name(), target.port, database, user)
            .map_err(|error| Failure::Passfile(error.to_string()))
    }

    /// A failure of a connection that had to be TLS, as an operator
    /// needs it: which host, which mode, and a certificate that did not
    /// verify, named.
    fn explain_tls(&self, target: &Target, tls: &DatabaseTls, failure: Failure) -> Failure {
        let Failure::Postgres(error) = &failure else {
            return failure;
        };
        let refused = tls.take_rejected();
        if error.as_db_error().is_some() || (refused.is_none() && !is_tls_failure(error)) {
            return failure;
        }
        let root = match &self.database.root_cert {
            RootCert::File(path) => format!("sslrootcert={}", path.display()),
            RootCert::System | RootCert::Absent => "the system's roots".to_owned(),
        };
        let certificate =
            refused.map_or_else(String::new, |c| format!("; the server's certificate: {c}"));
        Failure::Tls(format!(
            "TLS to {}:{} (sslmode={}, {root}): {}{certificate}",
            target.host_name(),
            target.port,
            self.database.ssl_mode.name(),
            with_causes(error)
        ))
    }
}

/// `error` and what caused it, each once: the client's TLS error says
/// only that the handshake failed, its cause why.
fn with_causes(error: &postgres::Error) -> String {
    let mut line = error.to_string();
    for cause in causes(error).skip(1) {
        let cause = cause.to_string();
        if !line.contains(&cause) {
            line = format!("{line}: {cause}");
        }
    }
    line
}

/// `error`, then its causes, an I/O error's inner error among them.
fn causes(error: &postgres::Error) -> impl Iterator<Item = &(dyn std::error::Error + 'static)> {
    std::iter::successors(Some(error as &(dyn std::error::Error + 'static)), |cause| {
        cause
            .downcast_ref::<io::Error>()
            .and_then(io::Error::get_ref)
            .map(|inner| inner as &(dyn std::error::Error + 'static))
            .or_else(|| cause.source())
    })
}

/// Whether the client's error says TLS cannot be had with this server as
/// configured: it would not speak it, or rustls refused the handshake (a
/// certificate that did not verify among the reasons). Not a connection
/// lost during the handshake, which is an outage like any other.
fn is_tls_failure(error: &postgres::Error) -> bool {
    causes(error).any(|cause| {
        cause.is::<rustls::Error>() || cause.to_string() == "server does not support TLS"
    })
}

/// Whether the server closed `client`'s connection while it sat idle
/// since `since`, and why: looked at before anything is handed to it.
///
/// The client reads its socket only while a call runs, so what the server
/// sent meanwhile (the FATAL of an idle-session timeout or of
/// `pg_terminate_backend`, or the close of a pooler or proxy) lies unread
/// and `is_closed` still says no. Asking for notifications with a zero
/// timeout sends nothing and lets the client's reactor turn once, which
/// reads it and ends the client. A close found here proves that nothing of
/// the next batch reached the server: the batch has not been handed to the
/// client yet (and a closed client refuses one unsent). Once it has been,
/// no failure proves that: the client queues it for its connection task,
/// and the same errors (the FATAL, or `Error::is_closed`) come whether the
/// close was read before the batch was written or came as its answer. So
/// such a batch is settled, never sent again. Looking waits for the
/// reactor's next millisecond tick, so a connection that answered within
/// [`LOOK_AFTER_IDLE`] is only asked whether it is known closed.
pub(super) fn closed_while_idle(client: &mut Client, since: Instant) -> Option<String> {
    if !client.is_closed() && since.elapsed() >= LOOK_AFTER_IDLE {
        let looked = client.notifications().timeout_iter(Duration::ZERO).next();
        if let Err(error) = looked {
            return Some(explain(&error));
        }
    }
    client
        .is_closed()
        .then(|| "the server closed the connection".to_owned())
}

/// `error` with what the server said, if it said something ("db error" alone
/// says little).
pub(super) fn explain(error: &postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{}: {}", db.severity(), db.message()),
        None => error.to_string(),
    }
}

/// A server error that says "not now" rather than "no": starting up or
/// shutting down (57P0x), out of connections or resources (53), a
/// connection failure (08). At start these are waited out like an
/// unreachable database.
pub(super) fn transient(error: &postgres::Error) -> bool {
    error
        .code()
        .map(postgres::error::SqlState::code)
        .is_some_and(|code| {
            code.starts_with("57P") || code.starts_with("53") || code.starts_with("08")
        })
}

/// An ERROR the server answered for a statement (as opposed to FATAL or
/// PANIC, which end the session, or a lost connection): the transaction
/// was rolled back.
pub(super) fn is_statement_error(error: &postgres::Error) -> bool {
    error
        .as_db_error()
        .is_some_and(|db| db.parsed_severity() == Some(postgres::error::Severity::Error))
}

/// Why a statement's ERROR refuses visits; for tables that are gone, what
/// to do, since they are not made again behind the operator's back.
pub(super) fn refusal(error: &postgres::Error) -> io::Error {
    let why = explain(error);
    if error.code() == Some(&postgres::error::SqlState::UNDEFINED_TABLE) {
        io::Error::other(format!(
            "{why}: the counter's tables are gone (dropped while it ran?); \
             restore them to go on counting, or restart the counter to make them again from 0"
        ))
    } else {
        io::Error::other(why)
    }
}
