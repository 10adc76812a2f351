//! A batch committed as one transaction on the writer's own part of the
//! count, and a commit whose connection was lost settled by that part's
//! record of its last batch.

use std::io;
use std::time::Instant;

use super::connection::{explain, is_statement_error, refusal};
use super::schema::{ROW_GONE, TOTAL, last_row, parse_number, read_total};
use super::{LOCK_WAIT, PostgresStore, describe};
use crate::store::{CommitError, Durable};

impl PostgresStore {
    /// Whether the unsettled batch committed, asked on a new connection.
    fn ask(&mut self, batch: u64) -> Result<Option<u64>, io::Error> {
        // The upsert on the writer's own part waits for the lost
        // transaction to end, if the server still holds it: for its row
        // lock, or for its insert of the part, where that was the
        // writer's first (a row lock would not wait for a row not yet
        // committed; a unique index does). The read after it, a
        // statement of its own and so a snapshot taken after the wait,
        // then sees its record or never will. The part it makes where
        // there is none adds 0.
        let query = format!(
            "BEGIN; SET LOCAL lock_timeout = '{}ms';
             INSERT INTO gateway_counter_parts AS part (writer, total, last_batch, updated)
               VALUES ('{writer}', 0, 0, now())
               ON CONFLICT (writer) DO UPDATE SET last_batch = part.last_batch;
             SELECT ({TOTAL}),
                    (SELECT last_batch FROM gateway_counter_parts WHERE writer = '{writer}');
             COMMIT;",
            LOCK_WAIT.as_millis(),
            writer = self.writer,
        );
        let answer = match self.connected() {
            Ok(session) => session.client.simple_query(&query),
            Err(error) => return Err(error.into_io()),
        };
        self.answered = Instant::now();
        let messages = answer.map_err(|error| {
            let why = explain(&error);
            self.lost(&why);
            io::Error::other(why)
        })?;
        let Some(values) = last_row(&messages, 2)? else {
            return Err(io::Error::other(
                "no answer to whether the lost batch committed",
            ));
        };
        let total = values[0]
            .as_deref()
            .ok_or_else(|| io::Error::other(ROW_GONE))
            .and_then(|total| parse_number(Some(total)))?;
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
        let batch = self.batch + 1;
        let number = i64::try_from(batch).map_err(|_| {
            CommitError::Refused(io::Error::other("more batches than a bigint holds"))
        })?;
        // Up to here nothing of the batch has been handed to the client:
        // a connection found closed was replaced, and the batch goes out
        // on the new one (see `closed_while_idle`).
        self.connected()?;
        // The session and the writer id borrowed apart: no copy of the id
        // per batch.
        let Some(session) = self.client.as_mut() else {
            return Err(CommitError::Refused(io::Error::other(
                "no connection to the database",
            )));
        };
        let answer = session
            .client
            .query_opt(&session.commit, &[&self.writer, &increments, &number]);
        // Sent, or maybe sent: this number is never used again.
        self.batch = batch;
        self.answered = Instant::now();
        // The answer comes back after the COMMIT's: a total here is durable.
        match answer {
            Ok(Some(row)) => {
                let read = row
                    .try_get::<_, i64>(0)
                    .and_then(|total| Ok((total, row.try_get::<_, bool>(1)?)))
                    .map_err(|error| io::Error::other(format!("an unreadable count: {error}")))
                    .and_then(|(total, inserted)| {
                        let total = u64::try_from(total)
                            .map_err(|_| io::Error::other(format!("a count below 0: {total}")))?;
                        Ok((total, inserted))
                    });
                match read {
                    // A part made anew: one folded into the base row
                    // while this statement waited is missing from its
                    // snapshot's count, and a statement of its own sees
                    // it. The batch is durable either way; a failed read
                    // leaves the count as the commit saw it.
                    Ok((total, true)) => Ok(self
                        .client
                        .as_mut()
                        .and_then(|session| read_total(&mut session.client).ok())
                        .unwrap_or(total)),
                    Ok((total, false)) => Ok(total),
                    Err(error) => {
                        self.unsettled = Some(batch);
                        Err(CommitError::Unsettled(error))
                    }
                }
            }
            // The statement and its COMMIT were answered, and there was
            // no base row: nothing was added.
            Ok(None) => Err(CommitError::Refused(io::Error::other(ROW_GONE))),
            // An ERROR (not FATAL) rolled the transaction back: nothing
            // of it committed. The connection is not used again, so that
            // the statement is prepared anew on the tables as they are
            // now (dropped and made again, say).
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
        describe(&self.connector.database)
    }
}
