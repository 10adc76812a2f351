//! The PostgreSQL store: one count shared by every counter process pointed
//! at the same database, on as many hosts as there are.
//!
//! The schema:
//!
//! ```sql
//! gateway_counter (id smallint PRIMARY KEY CHECK (id = 1), total bigint NOT NULL)
//! gateway_counter_parts (writer text PRIMARY KEY, total bigint NOT NULL,
//!                        last_batch bigint NOT NULL, updated timestamptz NOT NULL)
//! ```
//!
//! The count is the base row's total plus every writer's part. Each
//! process is a writer (a random id drawn at start) and adds only to its
//! own part, so that no row is shared by every host's commit: a commit
//! holds its row's lock through its `COMMIT`, WAL flush included, and one
//! shared row would make every host's commit wait behind every other's.
//! The base row holds what was counted before parts existed (a database
//! made by an earlier version keeps its total there) and the parts of
//! writers pruned for idleness, folded into it in the transaction that
//! deletes them.
//!
//! The tables are looked for once per process, on its first connection
//! (under an advisory lock, so that counters starting together do not
//! race), and only a table that is absent is made: once a DBA has made
//! them, the counter's role needs no right on the schema beyond using it.
//! Later connections only set the session's limits, so that tables that
//! vanish under a running counter (dropped) refuse its visits instead of
//! being made again with a count of 0; so does a missing base row.
//!
//! A batch is one transaction: add its increments to the writer's part
//! and record its number there as the writer's last batch. When the
//! connection is lost before the `COMMIT`'s answer came back, whether it
//! committed is settled on a new connection: once the writer's part is
//! locked (so the lost transaction has ended, one way or the other), its
//! last batch says. A batch is never sent twice.
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

mod commit;
mod connection;
mod passfile;
mod schema;
mod url;

use std::fmt::Write as _;
use std::io::{self, Read as _};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use std::sync::Arc;

use self::connection::{
    Attempt, Connector, Failure, Session, closed_while_idle, is_statement_error, refusal,
};
use self::schema::read_total;
pub use self::url::{Database, UrlError, describe, parse_url};
use super::{CommitError, Durable as _};

/// How often a lost database is tried again; 200s resume within about this
/// much of it coming back.
const RECONNECT_EVERY: Duration = Duration::from_millis(100);
/// How long settling a lost commit waits for the lost transaction's lock
/// on the writer's part (held while the server has not yet noticed the
/// lost connection).
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

/// A count kept in PostgreSQL.
pub struct PostgresStore {
    connector: Arc<Connector>,
    client: Option<Session>,
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

impl PostgresStore {
    /// Connects to the database at `url` and makes the tables where absent;
    /// returns the store and the count it holds. A database that cannot be
    /// reached, or does not answer within [`CONNECT_TIMEOUT`], is tried
    /// again with the first commit (visits are answered 503 until then);
    /// one that answers with an error (a wrong password, no such database,
    /// no right to make absent tables), or with TLS that `sslmode` does
    /// not accept, or whose password file cannot be used, is an error here.
    pub fn open(url: &str) -> io::Result<(Self, u64)> {
        let mut database = parse_url(url).map_err(io::Error::other)?;
        database
            .config
            .application_name("gateway counter")
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_user_timeout(NETWORK_TIMEOUT)
            .keepalives(true)
            .keepalives_idle(NETWORK_TIMEOUT)
            .keepalives_interval(Duration::from_secs(1))
            .keepalives_retries(3);
        let named = describe(&database);
        let connector = Connector::new(database)
            .map_err(|error| io::Error::other(format!("{named}: {error}")))?;
        let mut store = Self {
            connector: Arc::new(connector),
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
        let opened = store
            .connect()
            .and_then(|session| read_total(&mut session.client));
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
    fn connect(&mut self) -> Result<&mut Session, Failure> {
        self.client = None;
        let (attempt, wait) = match self.attempt.take() {
            Some(earlier) => (earlier, Duration::ZERO),
            None => {
                let writer = (!self.prepared).then_some(self.writer.as_str());
                (Attempt::start(&self.connector, writer)?, CONNECT_TIMEOUT)
            }
        };
        let (mut session, ready) = match attempt.answer.recv_timeout(wait) {
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
        if let Some(why) = closed_while_idle(&mut session.client, ready) {
            return Err(Failure::Unconnected(why));
        }
        if let Some(since) = self.lost_since.take() {
            tracing::info!(store = self.describe(), after = ?since.elapsed(), "database reconnected");
        }
        self.answered = ready;
        Ok(self.client.insert(session))
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
    fn connected(&mut self) -> Result<&mut Session, CommitError> {
        let answered = self.answered;
        if let Some(why) = self
            .client
            .as_mut()
            .and_then(|session| closed_while_idle(&mut session.client, answered))
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
        let answer = read_total(&mut self.connected()?.client);
        self.answered = Instant::now();
        match answer {
            Ok(total) => Ok(total),
            // A lone SELECT's ERROR leaves the session as it was.
            Err(Failure::Postgres(error)) if is_statement_error(&error) => {
                Err(CommitError::Refused(refusal(&error)))
            }
            // Not a connection's failures once it is made, but as they
            // would be: the connection is made again.
            Err(
                failure @ (Failure::Postgres(_)
                | Failure::Unconnected(_)
                | Failure::Tls(_)
                | Failure::Passfile(_)),
            ) => {
                let why = failure.explain();
                self.lost(&why);
                Err(CommitError::Refused(io::Error::other(why)))
            }
            Err(Failure::Unreadable(error)) => Err(CommitError::Refused(error)),
        }
    }
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
    fn writer_ids_are_32_hex_digits_and_differ() {
        let (a, b) = (writer_id().unwrap(), writer_id().unwrap());
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
