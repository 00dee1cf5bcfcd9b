//! Cursors over subscriptions: `DECLARE c CURSOR FOR SUBSCRIBE v`, then `FETCH … c` reads
//! the changes that arrived so far, for drivers that cannot consume an endless stream.
//!
//! Each connection keeps its own cursors (in its session extensions), so they end with it.
//! A FETCH returns at once when rows are waiting; when none are, it waits for the next
//! epoch's changes, or until its `timeout` and then returns no rows.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use datafusion::arrow::compute::concat_batches;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::execution::SendableRecordBatchStream;
use futures::{FutureExt, StreamExt};

use crate::error::{Error, Result};

/// The open cursors of one connection.
#[derive(Default)]
pub struct Cursors {
    open: tokio::sync::Mutex<HashMap<String, Cursor>>,
}

struct Cursor {
    schema: SchemaRef,
    stream: SendableRecordBatchStream,
    /// Rows received but not fetched yet.
    buffered: VecDeque<RecordBatch>,
    /// The subscription ended (its view was dropped): FETCH returns what is left.
    ended: bool,
}

fn no_such_cursor(name: &str) -> Error {
    Error::Plan { code: "34000", message: format!("cursor \"{name}\" does not exist"), position: None }
}

impl Cursors {
    /// Opens cursor `name` over a subscription's rows.
    pub async fn declare(&self, name: String, schema: SchemaRef, stream: SendableRecordBatchStream) -> Result<()> {
        let mut open = self.open.lock().await;
        if open.contains_key(&name) {
            return Err(Error::Plan {
                code: "42P03",
                message: format!("cursor \"{name}\" already exists"),
                position: None,
            });
        }
        open.insert(name, Cursor { schema, stream, buffered: VecDeque::new(), ended: false });
        Ok(())
    }

    /// The columns FETCH returns from `name`, if it is open.
    pub async fn schema(&self, name: &str) -> Option<SchemaRef> {
        self.open.lock().await.get(name).map(|c| c.schema.clone())
    }

    /// Up to `count` rows (all waiting rows for `None`). Waits for the next change when
    /// none are waiting, at most `timeout` if one is given.
    pub async fn fetch(
        &self,
        name: &str,
        count: Option<usize>,
        timeout: Option<Duration>,
    ) -> Result<(SchemaRef, RecordBatch)> {
        let mut open = self.open.lock().await;
        let cursor = open.get_mut(name).ok_or_else(|| no_such_cursor(name))?;
        let want = count.unwrap_or(usize::MAX);
        let mut taken: Vec<RecordBatch> = Vec::new();
        let mut rows = 0;
        loop {
            while rows < want {
                let Some(batch) = cursor.buffered.pop_front() else { break };
                let room = want - rows;
                if batch.num_rows() > room {
                    cursor.buffered.push_front(batch.slice(room, batch.num_rows() - room));
                    taken.push(batch.slice(0, room));
                    rows += room;
                } else {
                    rows += batch.num_rows();
                    taken.push(batch);
                }
            }
            if rows >= want || cursor.ended {
                break;
            }
            let next = if rows > 0 {
                // Something to return: take only what is already there.
                match cursor.stream.next().now_or_never() {
                    Some(next) => next,
                    None => break,
                }
            } else {
                match timeout {
                    Some(limit) => match tokio::time::timeout(limit, cursor.stream.next()).await {
                        Ok(next) => next,
                        Err(_) => break,
                    },
                    None => cursor.stream.next().await,
                }
            };
            match next {
                Some(Ok(batch)) => cursor.buffered.push_back(batch),
                Some(Err(e)) => return Err(Error::from_datafusion(e, "")),
                None => cursor.ended = true,
            }
        }
        let batch = concat_batches(&cursor.schema, &taken)?;
        Ok((cursor.schema.clone(), batch))
    }

    /// Closes `name`, or every cursor for `None`.
    pub async fn close(&self, name: Option<&str>) -> Result<()> {
        let mut open = self.open.lock().await;
        match name {
            None => open.clear(),
            Some(name) => {
                open.remove(name).ok_or_else(|| no_such_cursor(name))?;
            }
        }
        Ok(())
    }
}
