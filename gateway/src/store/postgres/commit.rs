//! A batch committed as one transaction, and a commit whose connection
//! was lost settled by the writer's record of its last batch.

use std::io;
use std::time::Instant;

use super::connection::{explain, is_statement_error, refusal};
use super::schema::{ROW_GONE, first_row, last_row, parse_number};
use super::{LOCK_WAIT, PostgresStore, describe};
use crate::store::{CommitError, Durable};

impl PostgresStore {
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
