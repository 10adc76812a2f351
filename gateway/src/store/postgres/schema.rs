//! The counter's tables: made where absent, once per process, and the
//! total read from them; with the reading of the answers to this store's
//! simple queries.

use std::fmt::Write as _;
use std::io;

use postgres::{Client, SimpleQueryMessage, SimpleQueryRow};

use super::STATEMENT_TIMEOUT;
use super::connection::Failure;

/// The session's limits, set on every connection.
pub(super) fn limits() -> String {
    let timeout = STATEMENT_TIMEOUT.as_millis();
    format!("SET statement_timeout = '{timeout}ms'; SET lock_timeout = '{timeout}ms';")
}

/// The tables, made where absent: the base total, and each writer's
/// part (see the module's doc in `mod.rs`).
pub(super) const COUNTER_TABLE: &str = "CREATE TABLE gateway_counter (
    id smallint PRIMARY KEY CHECK (id = 1),
    total bigint NOT NULL CHECK (total >= 0));";
pub(super) const PARTS_TABLE: &str = "CREATE TABLE gateway_counter_parts (
    writer text PRIMARY KEY,
    total bigint NOT NULL CHECK (total >= 0),
    last_batch bigint NOT NULL,
    updated timestamptz NOT NULL);";

/// How long a writer may go without a commit before its part is folded
/// into the base row, so that the parts table does not grow with every
/// process ever started.
const PRUNE_AFTER: &str = "7 days";

/// Readies the database, once per process: under an advisory lock (its
/// key is "gwcount" in ASCII, as every version has taken it), makes
/// whichever table is absent (looked up on the search path, as the
/// counter's statements find it), puts the base row in place with its
/// table, and folds the parts of writers idle for [`PRUNE_AFTER`], never
/// this one, into the base row in the same transaction, so the count
/// never moves. A database made by a version with one row for the whole
/// count is upgraded by this alone: its total stays in the base row, the
/// parts table is made beside it, and that version's writers table is
/// left to any counter of that version still running. A `CREATE ... IF
/// NOT EXISTS` would need `CREATE` on the schema even where the table
/// exists, and log a notice each time.
pub(super) fn prepare(client: &mut Client, writer: &str) -> Result<(), Failure> {
    let messages = client.simple_query(
        "BEGIN;
         SELECT pg_advisory_xact_lock(29123191556632180);
         SELECT to_regclass('gateway_counter') IS NULL,
                to_regclass('gateway_counter_parts') IS NULL;",
    )?;
    let absent = last_row(&messages, 2)?
        .ok_or_else(|| io::Error::other("no answer to whether the tables exist"))?;
    let mut statements = String::new();
    // The base row is made with its table only: a row deleted later
    // stays missing, an error for every counter, instead of coming back
    // at 0 with the next counter to start.
    if parse_bool(absent[0].as_deref())? {
        statements.push_str(COUNTER_TABLE);
        statements.push_str("INSERT INTO gateway_counter (id, total) VALUES (1, 0);");
    }
    if parse_bool(absent[1].as_deref())? {
        statements.push_str(PARTS_TABLE);
    }
    // The base row is locked first so that it cannot go between the
    // check and the fold: a part is deleted only where the base row is
    // there to take it. The hex writer id only: nothing here needs quoting.
    let _ = write!(
        statements,
        "SELECT FROM gateway_counter WHERE id = 1 FOR UPDATE;
         WITH pruned AS (
           DELETE FROM gateway_counter_parts
            WHERE updated < now() - interval '{PRUNE_AFTER}' AND writer <> '{writer}'
              AND EXISTS (SELECT FROM gateway_counter WHERE id = 1)
            RETURNING total)
         UPDATE gateway_counter SET total = total + (SELECT sum(total) FROM pruned)
          WHERE id = 1 AND EXISTS (SELECT FROM pruned);
         COMMIT;"
    );
    client.batch_execute(&statements)?;
    Ok(())
}

/// Why visits are refused once the base row was deleted: it is not
/// made again, which would start the count again from 0.
pub(super) const ROW_GONE: &str =
    "the counter's base row (gateway_counter, id = 1) is gone: restore it to go on counting";

/// The count: the base row and every writer's part, read in one
/// statement (one snapshot, so a part folded meanwhile is counted once).
pub(super) const TOTAL: &str =
    "SELECT c.total + (SELECT coalesce(sum(p.total), 0) FROM gateway_counter_parts p)
      FROM gateway_counter c WHERE c.id = 1";

/// A batch's commit: `$1` the writer, `$2` its increments, `$3` its
/// number. One statement, prepared on each connection, in a transaction
/// of its own, so one round trip and no `BEGIN`, `COMMIT` or `SET` to
/// parse. The writer adds to its own part, which no other writer's
/// commit touches, so commits from many hosts do not wait on one
/// another; the part is written only where the base row is there (a
/// base row deleted meanwhile is an error, not a count started again
/// from the parts): no row back then, and nothing added. The count it
/// answers is read in the statement's snapshot, from before its own
/// insert, so its part's new total is added to the others'. Where the
/// part was inserted rather than added to (`inserted`, true where the
/// new row has no `xmax`), it may have been folded into the base row by
/// a counter starting meanwhile, after that snapshot: the count is then
/// read again (see `commit.rs`). The session's
/// `statement_timeout` ends with the statement, before its implicit
/// `COMMIT` (PostgreSQL's `finish_xact_command`): a `COMMIT` waiting for
/// a synchronous standby is not cancelled, which would leave it
/// committed locally only, and answered as if replicated.
pub(super) const COMMIT_BATCH: &str = "WITH part AS (
      INSERT INTO gateway_counter_parts AS part (writer, total, last_batch, updated)
        SELECT $1, $2, $3, now() FROM gateway_counter WHERE id = 1
        ON CONFLICT (writer) DO UPDATE
        SET total = part.total + EXCLUDED.total,
            last_batch = GREATEST(part.last_batch, EXCLUDED.last_batch),
            updated = EXCLUDED.updated
        RETURNING total, xmax = 0 AS inserted)
    SELECT (c.total + part.total
            + (SELECT coalesce(sum(p.total), 0) FROM gateway_counter_parts p WHERE p.writer <> $1)
           )::bigint,
           part.inserted
      FROM gateway_counter c, part WHERE c.id = 1";

/// The count in the database. The base row is made with the tables, so
/// a missing one was deleted: an error, not a count of 0.
pub(super) fn read_total(client: &mut Client) -> Result<u64, Failure> {
    let messages = client.simple_query(TOTAL)?;
    let row = first_row(&messages, 1)?.ok_or_else(|| io::Error::other(ROW_GONE))?;
    Ok(parse_number(row[0].as_deref())?)
}

/// The values of the first row in a simple query's answer, which must have
/// `columns` columns.
pub(super) fn first_row(
    messages: &[SimpleQueryMessage],
    columns: usize,
) -> io::Result<Option<Vec<Option<String>>>> {
    row_values(rows(messages).next(), columns)
}

/// The values of the last row, which must have `columns` columns.
pub(super) fn last_row(
    messages: &[SimpleQueryMessage],
    columns: usize,
) -> io::Result<Option<Vec<Option<String>>>> {
    row_values(rows(messages).last(), columns)
}

pub(super) fn rows(messages: &[SimpleQueryMessage]) -> impl Iterator<Item = &SimpleQueryRow> {
    messages.iter().filter_map(|m| match m {
        SimpleQueryMessage::Row(row) => Some(row),
        _ => None,
    })
}

pub(super) fn row_values(
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

pub(super) fn parse_bool(value: Option<&str>) -> io::Result<bool> {
    match value {
        Some("t") => Ok(true),
        Some("f") => Ok(false),
        _ => Err(io::Error::other(format!(
            "expected true or false, the database answered {value:?}"
        ))),
    }
}

pub(super) fn parse_number(value: Option<&str>) -> io::Result<u64> {
    value.and_then(|v| v.parse().ok()).ok_or_else(|| {
        io::Error::other(format!("expected a count, the database answered {value:?}"))
    })
}
