//! A connection to the database: made on a thread of its own and waited
//! for, looked at for a close by the server before use, and what its
//! errors say.

use std::io;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use postgres::fallible_iterator::FallibleIterator as _;
use postgres::{Client, Config, NoTls};

use super::LOOK_AFTER_IDLE;
use super::schema::{limits, prepare};

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
            Self::Postgres(error) => explain(error),
            Self::Unreadable(error) => error.to_string(),
            Self::Unconnected(why) => why.clone(),
        }
    }

    /// Whether this says "not now" rather than "no": at start, waited out
    /// like an unreachable database (see [`transient`]).
    pub(super) fn unreachable(&self) -> bool {
        match self {
            Self::Postgres(error) => error.as_db_error().is_none() || transient(error),
            Self::Unreadable(_) => false,
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
    pub(super) answer: mpsc::Receiver<Result<(Client, Instant), Failure>>,
}

impl Attempt {
    /// Starts connecting with `config`; with `writer`, the tables are
    /// looked for too (see [`prepare`]).
    pub(super) fn start(config: &Config, writer: Option<&str>) -> Result<Self, Failure> {
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
pub(super) fn set_up(config: &Config, writer: Option<&str>) -> Result<Client, Failure> {
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
