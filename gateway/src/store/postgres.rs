//! The PostgreSQL store: one count shared by every counter process pointed
//! at the same database, on as many hosts as there are.
//!
//! The schema, created if absent (under an advisory lock, so that counters
//! starting together do not race on it):
//!
//! ```sql
//! gateway_counter (id smallint PRIMARY KEY CHECK (id = 1), total bigint NOT NULL)
//! gateway_counter_writers (writer text PRIMARY KEY, last_batch bigint NOT NULL,
//!                          updated timestamptz NOT NULL)
//! ```
//!
//! A batch is one transaction: add its increments to the total and record
//! its number as the last batch of this process (the writer, a random id
//! drawn at start). When the connection is lost before the `COMMIT`'s answer
//! came back, whether it committed is settled on a new connection: once the
//! total's row lock is taken (so the lost transaction has ended, one way or
//! the other), the writer's last batch says. A batch is never sent twice.
//!
//! The client is the blocking `postgres` crate, on the commit thread: it
//! runs the same under every runtime the gateway serves on.

use std::fmt::Write as _;
use std::io::{self, Read as _};
use std::time::{Duration, Instant};

use postgres::config::Host;
use postgres::{Client, Config, NoTls, SimpleQueryMessage, SimpleQueryRow};

use super::{CommitError, Durable};

/// How often a lost database is tried again; 200s resume within about this
/// much of it coming back.
const RECONNECT_EVERY: Duration = Duration::from_millis(100);
/// How long settling a lost commit waits for the lost transaction's row
/// lock (held while the server has not yet noticed the lost connection).
const LOCK_WAIT: Duration = Duration::from_secs(1);
/// Connection set-up, and how long sent data may go unacknowledged before
/// the connection counts as lost (a database host that vanished).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const NETWORK_TIMEOUT: Duration = Duration::from_secs(5);
/// How long any statement may run, or wait for a lock, before the server
/// cancels it (an error: nothing of it committed). Without it a lock held
/// elsewhere would hold every visit. Not the `COMMIT`: cancelling its
/// wait for a synchronous standby would leave it committed locally only,
/// and answered as if replicated.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);

/// The session's limits, then the schema, created if absent (the advisory
/// lock's key is "gwcount" in ASCII), with the total's row in place so
/// that settling always has a row to lock. Writers idle for a week are
/// forgotten, never this one (`{writer}`).
fn schema(writer: &str) -> String {
    let timeout = STATEMENT_TIMEOUT.as_millis();
    format!(
        "SET statement_timeout = '{timeout}ms'; SET lock_timeout = '{timeout}ms';
         BEGIN;
         SELECT pg_advisory_xact_lock(29123191556632180);
         CREATE TABLE IF NOT EXISTS gateway_counter (
             id smallint PRIMARY KEY CHECK (id = 1),
             total bigint NOT NULL CHECK (total >= 0));
         CREATE TABLE IF NOT EXISTS gateway_counter_writers (
             writer text PRIMARY KEY,
             last_batch bigint NOT NULL,
             updated timestamptz NOT NULL);
         INSERT INTO gateway_counter (id, total) VALUES (1, 0) ON CONFLICT (id) DO NOTHING;
         DELETE FROM gateway_counter_writers
           WHERE updated < now() - interval '7 days' AND writer <> '{writer}';
         COMMIT;"
    )
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
    /// Connects to the database at `url` and creates the schema if absent;
    /// returns the store and the count it holds. A database that cannot be
    /// reached is tried again with the first commit (visits are answered
    /// 503 until then); one that answers with an error (a wrong password,
    /// no such database, no right to create the tables) is an error here.
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
        };
        let total = match store.connect().and_then(read_total) {
            Ok(Ok(total)) => total,
            Ok(Err(unreadable)) => {
                return Err(io::Error::other(format!(
                    "{}: {unreadable}",
                    store.describe()
                )));
            }
            Err(error) if error.as_db_error().is_some() && !transient(&error) => {
                return Err(io::Error::other(format!(
                    "{}: {}",
                    store.describe(),
                    explain(&error)
                )));
            }
            Err(error) => {
                tracing::warn!(
                    store = store.describe(),
                    error = explain(&error),
                    "cannot reach the database; visits are answered 503 until it is back"
                );
                store.lost(error);
                0
            }
        };
        Ok((store, total))
    }

    /// A new connection, with the schema in place.
    fn connect(&mut self) -> Result<&mut Client, postgres::Error> {
        self.client = None;
        let mut client = self.config.connect(NoTls)?;
        client.batch_execute(&schema(&self.writer))?;
        if let Some(since) = self.lost_since.take() {
            tracing::info!(store = self.describe(), after = ?since.elapsed(), "database reconnected");
        }
        Ok(self.client.insert(client))
    }

    /// Forgets the connection after `error`.
    fn lost(&mut self, error: postgres::Error) {
        self.client = None;
        self.next_connect = Instant::now() + RECONNECT_EVERY;
        if self.lost_since.is_none() {
            self.lost_since = Some(Instant::now());
            tracing::warn!(
                store = self.describe(),
                error = explain(&error),
                "lost the database; reconnecting"
            );
        }
    }

    /// The open connection, or a new one; an error if there is none and it
    /// is not yet time to try again.
    fn connected(&mut self) -> Result<&mut Client, CommitError> {
        if self.client.as_ref().is_some_and(Client::is_closed) {
            self.client = None;
        }
        if self.client.is_none() {
            if Instant::now() < self.next_connect {
                return Err(CommitError::Refused(io::Error::other(
                    "no connection to the database (reconnecting)",
                )));
            }
            if let Err(error) = self.connect() {
                let refused = CommitError::Refused(io::Error::other(explain(&error)));
                self.lost(error);
                return Err(refused);
            }
        }
        self.client
            .as_mut()
            .ok_or_else(|| CommitError::Refused(io::Error::other("no connection to the database")))
    }

    fn read(&mut self) -> Result<u64, CommitError> {
        match read_total(self.connected()?) {
            Ok(answer) => answer.map_err(CommitError::Refused),
            Err(error) => {
                let refused = CommitError::Refused(io::Error::other(explain(&error)));
                self.lost(error);
                Err(refused)
            }
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
        let messages = answer.map_err(|error| {
            let why = io::Error::other(explain(&error));
            self.lost(error);
            why
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
        let query = format!(
            "BEGIN;
             INSERT INTO gateway_counter (id, total) VALUES (1, {increments})
               ON CONFLICT (id) DO UPDATE SET total = gateway_counter.total + EXCLUDED.total
               RETURNING total;
             INSERT INTO gateway_counter_writers (writer, last_batch, updated) VALUES ('{writer}', {batch}, now())
               ON CONFLICT (writer) DO UPDATE
               SET last_batch = GREATEST(gateway_counter_writers.last_batch, EXCLUDED.last_batch),
                   updated = EXCLUDED.updated;
             SET LOCAL statement_timeout = 0;
             COMMIT;"
        );
        let answer = self.connected()?.simple_query(&query);
        // Sent, or maybe sent: this number is never used again.
        self.batch = batch;
        // The answer comes back after the COMMIT's: a total here is durable.
        match answer {
            Ok(messages) => match first_row(&messages, 1)
                .and_then(|row| parse_number(row.and_then(|r| r[0].clone()).as_deref()))
            {
                Ok(total) => Ok(total),
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
                Err(CommitError::Refused(io::Error::other(explain(&error))))
            }
            Err(error) => {
                let why = io::Error::other(format!(
                    "the connection was lost during the commit: {}",
                    explain(&error)
                ));
                self.lost(error);
                self.unsettled = Some(batch);
                Err(CommitError::Unsettled(why))
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

/// The total in the database (0 if its row is not there yet): the outer
/// error is the connection's or the server's, the inner one an answer that
/// is not a count.
fn read_total(client: &mut Client) -> Result<io::Result<u64>, postgres::Error> {
    let messages = client.simple_query("SELECT total FROM gateway_counter WHERE id = 1")?;
    Ok(first_row(&messages, 1).and_then(|row| match row {
        Some(values) => parse_number(values[0].as_deref()),
        None => Ok(0),
    }))
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
