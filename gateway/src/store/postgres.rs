//! The PostgreSQL store: one count shared by every counter process pointed
//! at the same database, on as many hosts as there are.
//!
//! The schema:
//!
//! ```sql
//! gateway_counter (id smallint PRIMARY KEY CHECK (id = 1), total bigint NOT NULL)
//! gateway_counter_writers (writer text PRIMARY KEY, last_batch bigint NOT NULL,
//!                          updated timestamptz NOT NULL)
//! ```
//!
//! The tables are looked for once per process, on its first connection
//! (under an advisory lock, so that counters starting together do not
//! race), and only a table that is absent is made: once a DBA has made
//! them, the counter's role needs no right on the schema beyond using it.
//! Later connections only set the session's limits, so that tables that
//! vanish under a running counter (dropped) refuse its visits instead of
//! being made again with a count of 0; so does a missing total's row.
//!
//! A batch is one transaction: add its increments to the total and record
//! its number as the last batch of this process (the writer, a random id
//! drawn at start). When the connection is lost before the `COMMIT`'s answer
//! came back, whether it committed is settled on a new connection: once the
//! total's row lock is taken (so the lost transaction has ended, one way or
//! the other), the writer's last batch says. A batch is never sent twice.
//! A connection the server closed while it was idle (an idle-session
//! timeout, a terminated backend, a pooler or a proxy letting go) is
//! noticed before a batch is handed to it, and the batch goes out on a new
//! one instead: see [`closed_while_idle`] for where that line is drawn.
//!
//! The client is the blocking `postgres` crate, on the commit thread: it
//! runs the same under every runtime the gateway serves on. A connection
//! is made (the socket, logging in, the session's limits, the tables) on
//! a thread of its own, waited for at most [`CONNECT_TIMEOUT`]: the
//! client's own timeout bounds the socket's connect only, and a database
//! whose host accepts connections but never answers (a stopped
//! postmaster, a hung proxy: its kernel acknowledges everything, so no
//! TCP timeout fires) would otherwise hold the start, or every visit,
//! forever. An attempt that has not answered by then is kept, and until
//! it does, connections are refused at once instead of starting another:
//! a silent database holds one thread, which ends with its connection.

use std::fmt::Write as _;
use std::io::{self, Read as _};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use postgres::config::Host;
use postgres::fallible_iterator::FallibleIterator as _;
use postgres::{Client, Config, NoTls, SimpleQueryMessage, SimpleQueryRow};

use super::{CommitError, Durable};

/// How often a lost database is tried again; 200s resume within about this
/// much of it coming back.
const RECONNECT_EVERY: Duration = Duration::from_millis(100);
/// How long settling a lost commit waits for the lost transaction's row
/// lock (held while the server has not yet noticed the lost connection).
const LOCK_WAIT: Duration = Duration::from_secs(1);
/// How long a connection's whole set-up is waited for before the database
/// counts as unreachable (see [`PostgresStore::connect`]).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long sent data may go unacknowledged before the connection counts
/// as lost (a database host that vanished).
const NETWORK_TIMEOUT: Duration = Duration::from_secs(5);
/// How long any statement may run, or wait for a lock, before the server
/// cancels it (an error: nothing of it committed). Without it a lock held
/// elsewhere would hold every visit. Not the `COMMIT`: cancelling its
/// wait for a synchronous standby would leave it committed locally only,
/// and answered as if replicated.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a connection may have been left alone before it is looked at
/// for a close by the server before use. Looking costs up to a millisecond
/// (see [`closed_while_idle`]): batches that follow one another at once
/// skip it, and a close that lands in that gap is settled as before.
const LOOK_AFTER_IDLE: Duration = Duration::from_millis(10);

/// The session's limits, set on every connection.
fn limits() -> String {
    let timeout = STATEMENT_TIMEOUT.as_millis();
    format!("SET statement_timeout = '{timeout}ms'; SET lock_timeout = '{timeout}ms';")
}

/// The tables, made where absent.
const COUNTER_TABLE: &str = "CREATE TABLE gateway_counter (
    id smallint PRIMARY KEY CHECK (id = 1),
    total bigint NOT NULL CHECK (total >= 0));";
const WRITERS_TABLE: &str = "CREATE TABLE gateway_counter_writers (
    writer text PRIMARY KEY,
    last_batch bigint NOT NULL,
    updated timestamptz NOT NULL);";

/// Readies the database, once per process: under an advisory lock (its
/// key is "gwcount" in ASCII), makes whichever table is absent (looked up
/// on the search path, as the counter's statements find it), puts the
/// total's row in place so that settling always has a row to lock, and
/// forgets writers idle for a week, never this one. A `CREATE ... IF NOT
/// EXISTS` would need `CREATE` on the schema even where the table exists,
/// and log a notice each time.
fn prepare(client: &mut Client, writer: &str) -> Result<(), Failure> {
    let messages = client.simple_query(
        "BEGIN;
         SELECT pg_advisory_xact_lock(29123191556632180);
         SELECT to_regclass('gateway_counter') IS NULL,
                to_regclass('gateway_counter_writers') IS NULL;",
    )?;
    let absent = last_row(&messages, 2)?
        .ok_or_else(|| io::Error::other("no answer to whether the tables exist"))?;
    let mut statements = String::new();
    // The total's row is made with its table only: a row deleted later
    // stays missing, an error for every counter, instead of coming back
    // at 0 with the next counter to start.
    if parse_bool(absent[0].as_deref())? {
        statements.push_str(COUNTER_TABLE);
        statements.push_str("INSERT INTO gateway_counter (id, total) VALUES (1, 0);");
    }
    if parse_bool(absent[1].as_deref())? {
        statements.push_str(WRITERS_TABLE);
    }
    // The hex writer id only: nothing here needs quoting.
    let _ = write!(
        statements,
        "DELETE FROM gateway_counter_writers
           WHERE updated < now() - interval '7 days' AND writer <> '{writer}';
         COMMIT;"
    );
    client.batch_execute(&statements)?;
    Ok(())
}

/// Why visits are refused once the total's row was deleted: it is not
/// made again, which would start the count again from 0.
const ROW_GONE: &str = "the counter's total row (id = 1) is gone: restore it to go on counting";

/// Why a connection could not be readied, or a read failed.
#[derive(Debug)]
enum Failure {
    /// The connection's or the server's error.
    Postgres(postgres::Error),
    /// An answer that is not what this store's query gives.
    Unreadable(io::Error),
    /// No connection, and nothing the server said: an attempt with no
    /// answer yet, or none could be made. As for an unreachable database.
    Unconnected(String),
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
    fn explain(&self) -> String {
        match self {
            Self::Postgres(error) => explain(error),
            Self::Unreadable(error) => error.to_string(),
            Self::Unconnected(why) => why.clone(),
        }
    }

    /// Whether this says "not now" rather than "no": at start, waited out
    /// like an unreachable database (see [`transient`]).
    fn unreachable(&self) -> bool {
        match self {
            Self::Postgres(error) => error.as_db_error().is_none() || transient(error),
            Self::Unreadable(_) => false,
            Self::Unconnected(_) => true,
        }
    }
}

/// A connection being made on a thread of its own.
struct Attempt {
    started: Instant,
    /// Whether it looks for the tables too.
    prepares: bool,
    /// The connection, with when it was ready, or why there is none.
    answer: mpsc::Receiver<Result<(Client, Instant), Failure>>,
}

impl Attempt {
    /// Starts connecting with `config`; with `writer`, the tables are
    /// looked for too (see [`prepare`]).
    fn start(config: &Config, writer: Option<&str>) -> Result<Self, Failure> {
        let (config, writer) = (config.clone(), writer.map(str::to_owned));
        let prepares = writer.is_some();
        let (send, answer) = mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("gateway-pg-connect".to_owned())
            .spawn(move || {
                let made = set_up(&config, writer.as_deref());
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

/// A new connection, with its session's limits set, and with `writer` the
/// tables looked for: everything that waits on the server before a
/// connection can take a batch.
fn set_up(config: &Config, writer: Option<&str>) -> Result<Client, Failure> {
    let mut client = config.connect(NoTls)?;
    client.batch_execute(&limits())?;
    if let Some(writer) = writer {
        prepare(&mut client, writer)?;
    }
    Ok(client)
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
fn closed_while_idle(client: &mut Client, since: Instant) -> Option<String> {
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

/// A count kept in PostgreSQL.
pub struct PostgresStore {
    config: Config,
    client: Option<Client>,
    /// No connection is tried before this, after one failed.
    next_connect: Instant,
    /// When the database was lost, for one log line per outage.
    lost_since: Option<Instant>,
    /// This process's writer id: 32 hex digits.
    writer: String,
    /// The number of the last batch sent.
    batch: u64,
    /// A batch whose connection was lost in flight, not yet settled.
    unsettled: Option<u64>,
    /// Whether the tables were found (or made) on a connection of this
    /// process: later connections do not make them again.
    prepared: bool,
    /// A connection attempt that had no answer in [`CONNECT_TIMEOUT`]:
    /// until it has one, no other is started.
    attempt: Option<Attempt>,
    /// When the connection last answered, or was made.
    answered: Instant,
}

/// `error` with what the server said, if it said something ("db error" alone
/// says little).
fn explain(error: &postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{}: {}", db.severity(), db.message()),
        None => error.to_string(),
    }
}

/// A server error that says "not now" rather than "no": starting up or
/// shutting down (57P0x), out of connections or resources (53), a
/// connection failure (08). At start these are waited out like an
/// unreachable database.
fn transient(error: &postgres::Error) -> bool {
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
fn is_statement_error(error: &postgres::Error) -> bool {
    error
        .as_db_error()
        .is_some_and(|db| db.parsed_severity() == Some(postgres::error::Severity::Error))
}

/// Why a statement's ERROR refuses visits; for tables that are gone, what
/// to do, since they are not made again behind the operator's back.
fn refusal(error: &postgres::Error) -> io::Error {
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

/// `postgres_url` parsed, as the configuration checks it: an error says why.
pub fn parse_url(url: &str) -> Result<Config, String> {
    let config: Config = url.parse().map_err(|e| format!("{e}"))?;
    if config.get_ssl_mode() == postgres::config::SslMode::Require {
        return Err(
            "sslmode=require: TLS to PostgreSQL is not supported yet (use a Unix socket, or sslmode=disable on a trusted network)"
                .to_owned(),
        );
    }
    Ok(config)
}

impl PostgresStore {
    /// Connects to the database at `url` and makes the tables where absent;
    /// returns the store and the count it holds. A database that cannot be
    /// reached, or does not answer within [`CONNECT_TIMEOUT`], is tried
    /// again with the first commit (visits are answered 503 until then);
    /// one that answers with an error (a wrong password, no such database,
    /// no right to make absent tables) is an error here.
    pub fn open(url: &str) -> io::Result<(Self, u64)> {
        let mut config = parse_url(url).map_err(io::Error::other)?;
        config
            .application_name("gateway counter")
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_user_timeout(NETWORK_TIMEOUT)
            .keepalives(true)
            .keepalives_idle(NETWORK_TIMEOUT)
            .keepalives_interval(Duration::from_secs(1))
            .keepalives_retries(3);
        let mut store = Self {
            config,
            client: None,
            next_connect: Instant::now(),
            lost_since: None,
            writer: writer_id()?,
            batch: 0,
            unsettled: None,
            prepared: false,
            attempt: None,
            answered: Instant::now(),
        };
        let opened = store.connect().and_then(read_total);
        let total = match opened {
            Ok(total) => total,
            Err(failure) if failure.unreachable() => {
                let why = failure.explain();
                tracing::warn!(
                    store = store.describe(),
                    error = why,
                    "cannot reach the database; visits are answered 503 until it is back"
                );
                store.lost(&why);
                0
            }
            Err(failure) => {
                return Err(io::Error::other(format!(
                    "{}: {}",
                    store.describe(),
                    failure.explain()
                )));
            }
        };
        Ok((store, total))
    }

    /// A new connection, with its session's limits set, and the tables
    /// looked for if no connection of this process has yet: made on a
    /// thread of its own and waited for at most [`CONNECT_TIMEOUT`]. An
    /// attempt not answered by then is kept, and the next call takes its
    /// outcome if it has one, or is refused at once if not, so that a
    /// database that never answers holds one thread, not one per call.
    fn connect(&mut self) -> Result<&mut Client, Failure> {
        self.client = None;
        let (attempt, wait) = match self.attempt.take() {
            Some(earlier) => (earlier, Duration::ZERO),
            None => {
                let writer = (!self.prepared).then_some(self.writer.as_str());
                (Attempt::start(&self.config, writer)?, CONNECT_TIMEOUT)
            }
        };
        let (mut client, ready) = match attempt.answer.recv_timeout(wait) {
            Ok(made) => made?,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let waited = attempt.started.elapsed().as_secs();
                self.attempt = Some(attempt);
                return Err(Failure::Unconnected(format!(
                    "a connection attempt to the database has had no answer for {waited} s"
                )));
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(Failure::Unconnected(
                    "the connection attempt to the database ended without an outcome".to_owned(),
                ));
            }
        };
        if attempt.prepares {
            self.prepared = true;
        }
        // An attempt answered late made its connection a while ago: the
        // server may have closed it since, as it may an idle one.
        if let Some(why) = closed_while_idle(&mut client, ready) {
            return Err(Failure::Unconnected(why));
        }
        if let Some(since) = self.lost_since.take() {
            tracing::info!(store = self.describe(), after = ?since.elapsed(), "database reconnected");
        }
        self.answered = ready;
        Ok(self.client.insert(client))
    }

    /// Forgets the connection after an error that says the database is
    /// unreachable, and waits a while before trying again.
    fn lost(&mut self, why: &str) {
        self.client = None;
        self.next_connect = Instant::now() + RECONNECT_EVERY;
        if self.lost_since.is_none() {
            self.lost_since = Some(Instant::now());
            tracing::warn!(
                store = self.describe(),
                error = why,
                "lost the database; reconnecting"
            );
        }
    }

    /// The open connection, or a new one; an error if there is none and it
    /// is not yet time to try again. An open connection the server has
    /// closed meanwhile is replaced at once: nothing was sent on it.
    fn connected(&mut self) -> Result<&mut Client, CommitError> {
        let answered = self.answered;
        if let Some(why) = self
            .client
            .as_mut()
            .and_then(|client| closed_while_idle(client, answered))
        {
            tracing::info!(
                store = self.describe(),
                why,
                "the database closed the idle connection; using a new one"
            );
            self.client = None;
        }
        if self.client.is_none() {
            if Instant::now() < self.next_connect {
                return Err(CommitError::Refused(io::Error::other(
                    "no connection to the database (reconnecting)",
                )));
            }
            if let Err(failure) = self.connect() {
                let why = failure.explain();
                self.lost(&why);
                return Err(CommitError::Refused(io::Error::other(why)));
            }
        }
        self.client
            .as_mut()
            .ok_or_else(|| CommitError::Refused(io::Error::other("no connection to the database")))
    }

    fn read(&mut self) -> Result<u64, CommitError> {
        let answer = read_total(self.connected()?);
        self.answered = Instant::now();
        match answer {
            Ok(total) => Ok(total),
            // A lone SELECT's ERROR leaves the session as it was.
            Err(Failure::Postgres(error)) if is_statement_error(&error) => {
                Err(CommitError::Refused(refusal(&error)))
            }
            Err(failure @ (Failure::Postgres(_) | Failure::Unconnected(_))) => {
                let why = failure.explain();
                self.lost(&why);
                Err(CommitError::Refused(io::Error::other(why)))
            }
            Err(Failure::Unreadable(error)) => Err(CommitError::Refused(error)),
        }
    }

    /// Whether the unsettled batch committed, asked on a new connection.
    fn ask(&mut self, batch: u64) -> Result<Option<u64>, io::Error> {
        // The row lock waits for the lost transaction to end, if the
        // server still holds it; the read after it, a statement of its own
        // and so a snapshot taken after the wait, then sees its record or
        // never will. (Read in the locking statement, the writer's row
        // would be as it was before the wait.)
        let query = format!(
            "BEGIN; SET LOCAL lock_timeout = '{}ms';
             SELECT FROM gateway_counter WHERE id = 1 FOR UPDATE;
             SELECT c.total, (SELECT w.last_batch FROM gateway_counter_writers w WHERE w.writer = '{}')
               FROM gateway_counter c WHERE c.id = 1;
             COMMIT;",
            LOCK_WAIT.as_millis(),
            self.writer
        );
        let answer = match self.connected() {
            Ok(client) => client.simple_query(&query),
            Err(error) => return Err(error.into_io()),
        };
        self.answered = Instant::now();
        let messages = answer.map_err(|error| {
            let why = explain(&error);
            self.lost(&why);
            io::Error::other(why)
        })?;
        let Some(values) = last_row(&messages, 2)? else {
            return Err(io::Error::other("the counter's row is missing"));
        };
        let total = parse_number(values[0].as_deref())?;
        let last = values[1]
            .as_deref()
            .map(|v| parse_number(Some(v)))
            .transpose()?;
        match last {
            Some(last) if last == batch => Ok(Some(total)),
            Some(last) if last > batch => Err(io::Error::other(format!(
                "this counter's last batch is {last}, past the lost {batch}: another process with the same id?"
            ))),
            _ => Ok(None),
        }
    }
}

impl Durable for PostgresStore {
    fn commit(&mut self, increments: u64) -> Result<u64, CommitError> {
        if increments == 0 {
            return self.read();
        }
        let increments = i64::try_from(increments).map_err(|_| {
            CommitError::Refused(io::Error::other("more increments than a bigint holds"))
        })?;
        let (writer, batch) = (&self.writer, self.batch + 1);
        // Numbers and the hex writer id only: nothing here needs quoting.
        // An UPDATE, not an upsert: a total's row deleted meanwhile is an
        // error, not a count started again from this batch.
        let query = format!(
            "BEGIN;
             UPDATE gateway_counter SET total = total + {increments} WHERE id = 1
               RETURNING total;
             INSERT INTO gateway_counter_writers (writer, last_batch, updated) VALUES ('{writer}', {batch}, now())
               ON CONFLICT (writer) DO UPDATE
               SET last_batch = GREATEST(gateway_counter_writers.last_batch, EXCLUDED.last_batch),
                   updated = EXCLUDED.updated;
             SET LOCAL statement_timeout = 0;
             COMMIT;"
        );
        // Up to here nothing of the batch has been handed to the client:
        // a connection found closed was replaced, and the batch goes out
        // on the new one (see `closed_while_idle`).
        let answer = self.connected()?.simple_query(&query);
        // Sent, or maybe sent: this number is never used again.
        self.batch = batch;
        self.answered = Instant::now();
        // The answer comes back after the COMMIT's: a total here is durable.
        match answer {
            Ok(messages) => match first_row(&messages, 1) {
                Ok(Some(row)) => parse_number(row[0].as_deref()).map_err(|error| {
                    self.unsettled = Some(batch);
                    CommitError::Unsettled(error)
                }),
                // Every statement was answered, the COMMIT too, and the
                // UPDATE found no row: nothing was added (the writer's
                // record of this number alone committed, harmlessly).
                Ok(None) => Err(CommitError::Refused(io::Error::other(ROW_GONE))),
                // An answer this store's query does not give: settled
                // like a lost one, by the writer's record.
                Err(error) => {
                    self.unsettled = Some(batch);
                    Err(CommitError::Unsettled(error))
                }
            },
            // An ERROR (not FATAL) aborted the transaction: nothing of
            // it committed. The session is left in the aborted
            // transaction, so it is not used again.
            Err(error) if is_statement_error(&error) => {
                self.client = None;
                Err(CommitError::Refused(refusal(&error)))
            }
            Err(error) => {
                let why = explain(&error);
                self.lost(&why);
                self.unsettled = Some(batch);
                Err(CommitError::Unsettled(io::Error::other(format!(
                    "the connection was lost during the commit: {why}"
                ))))
            }
        }
    }

    fn settle(&mut self) -> io::Result<Option<u64>> {
        let Some(batch) = self.unsettled else {
            return Ok(None);
        };
        let settled = self.ask(batch)?;
        self.unsettled = None;
        if settled.is_some() {
            tracing::info!(
                store = self.describe(),
                batch,
                "the commit whose connection was lost had committed"
            );
        }
        Ok(settled)
    }

    fn abandon(&mut self) {
        self.unsettled = None;
    }

    fn shared(&self) -> bool {
        true
    }

    fn describe(&self) -> String {
        describe(&self.config)
    }
}

/// The database a configuration names, as a URL without its password
/// (a Unix socket folder as it is).
pub fn describe(config: &Config) -> String {
    let mut line = String::from("postgres://");
    if let Some(user) = config.get_user() {
        let _ = write!(line, "{user}@");
    }
    for (i, host) in config.get_hosts().iter().enumerate() {
        if i > 0 {
            line.push(',');
        }
        match host {
            Host::Tcp(name) => line.push_str(name),
            Host::Unix(path) => line.push_str(&path.display().to_string()),
        }
        if let Some(port) = config.get_ports().get(i).or(config.get_ports().first()) {
            let _ = write!(line, ":{port}");
        }
    }
    if let Some(dbname) = config.get_dbname() {
        let _ = write!(line, "/{dbname}");
    }
    line
}

/// The total in the database. Its row is made with the tables, so a
/// missing one was deleted: an error, not a count of 0.
fn read_total(client: &mut Client) -> Result<u64, Failure> {
    let messages = client.simple_query("SELECT total FROM gateway_counter WHERE id = 1")?;
    let row = first_row(&messages, 1)?.ok_or_else(|| io::Error::other(ROW_GONE))?;
    Ok(parse_number(row[0].as_deref())?)
}

/// The values of the first row in a simple query's answer, which must have
/// `columns` columns.
fn first_row(
    messages: &[SimpleQueryMessage],
    columns: usize,
) -> io::Result<Option<Vec<Option<String>>>> {
    row_values(rows(messages).next(), columns)
}

/// The values of the last row, which must have `columns` columns.
fn last_row(
    messages: &[SimpleQueryMessage],
    columns: usize,
) -> io::Result<Option<Vec<Option<String>>>> {
    row_values(rows(messages).last(), columns)
}

fn rows(messages: &[SimpleQueryMessage]) -> impl Iterator<Item = &SimpleQueryRow> {
    messages.iter().filter_map(|m| match m {
        SimpleQueryMessage::Row(row) => Some(row),
        _ => None,
    })
}

fn row_values(
    row: Option<&SimpleQueryRow>,
    columns: usize,
) -> io::Result<Option<Vec<Option<String>>>> {
    let Some(row) = row else {
        return Ok(None);
    };
    if row.len() != columns {
        return Err(io::Error::other(format!(
            "expected {columns} columns, the database answered {}",
            row.len()
        )));
    }
    (0..columns)
        .map(|i| {
            row.try_get(i)
                .map(|value| value.map(str::to_owned))
                .map_err(|e| io::Error::other(format!("an unreadable answer: {e}")))
        })
        .collect::<io::Result<Vec<_>>>()
        .map(Some)
}

fn parse_bool(value: Option<&str>) -> io::Result<bool> {
    match value {
        Some("t") => Ok(true),
        Some("f") => Ok(false),
        _ => Err(io::Error::other(format!(
            "expected true or false, the database answered {value:?}"
        ))),
    }
}

fn parse_number(value: Option<&str>) -> io::Result<u64> {
    value.and_then(|v| v.parse().ok()).ok_or_else(|| {
        io::Error::other(format!("expected a count, the database answered {value:?}"))
    })
}

/// 128 random bits, in hex: this process among the database's writers.
fn writer_id() -> io::Result<String> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut random| random.read_exact(&mut bytes))
        .map_err(|e| io::Error::new(e.kind(), format!("/dev/urandom: {e}")))?;
    Ok(bytes.iter().fold(String::with_capacity(32), |mut hex, b| {
        let _ = write!(hex, "{b:02x}");
        hex
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_and_described_without_their_password() {
        let config = parse_url("postgres://gateway:secret@db.example:6543/visits").unwrap();
        assert_eq!(
            describe(&config),
            "postgres://gateway@db.example:6543/visits"
        );
        let config = parse_url("postgres://gateway@%2Frun%2Fpostgresql/gateway").unwrap();
        assert_eq!(
            describe(&config),
            "postgres://gateway@/run/postgresql:5432/gateway"
        );
        assert!(
            parse_url("postgres://h/db?sslmode=require")
                .unwrap_err()
                .contains("TLS")
        );
        assert!(parse_url("postgres://h:99999/db").is_err());
        assert!(parse_url("postgres://h/db?nonsense=1").is_err());
    }

    #[test]
    fn writer_ids_are_32_hex_digits_and_differ() {
        let (a, b) = (writer_id().unwrap(), writer_id().unwrap());
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
