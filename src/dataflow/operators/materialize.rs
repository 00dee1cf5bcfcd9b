//! [`MaterializeOperator`]: the last node of a view's graph. It collects an epoch's changes
//! and hands them, consolidated, to an [`EpochSink`] when the epoch's barrier arrives.
//! The sink (owned by the catalog) applies them to the view's arrangement and publishes it.
//!
//! An epoch that only inserts is handed over in the batches it arrived in, not copied into
//! one: a view over a source then keeps the source's own Arrow buffers for the columns it
//! passes through.

use async_trait::async_trait;
use datafusion::arrow::datatypes::SchemaRef;

use datafusion::arrow::record_batch::RecordBatch;
use datafusion::arrow::row::{RowConverter, SortField};

use crate::dataflow::ChangeBatch;
use crate::dataflow::checkpoint::{LocalStore, StateReader, StateWriter};
use crate::dataflow::operator::{Barrier, Operator, Output};
use crate::error::Result;
use crate::state::spill::{LocalState, SpillStore, StateFile};

/// Receives each epoch's net change to a view.
pub trait EpochSink: Send {
    /// Called once per barrier, in epoch order, with the epoch's net change in parts: the
    /// batches it arrived in when it only inserts (none empty), else one consolidated batch.
    fn commit(&mut self, barrier: &Barrier, parts: Vec<ChangeBatch>) -> Result<()>;

    /// The view's rows as of the last commit, for a checkpoint (`None`: not kept).
    fn checkpoint(&mut self) -> Result<Option<Vec<u8>>> {
        Ok(None)
    }

    /// Loads rows [`EpochSink::checkpoint`] wrote, before the first commit.
    fn restore(&mut self, _state: &[u8]) -> Result<()> {
        Err(crate::error::Error::Internal("this sink keeps no checkpointed rows".into()))
    }

    /// The view's rows as of the last commit (`None`: not kept).
    fn rows(&self) -> Result<Option<Vec<RecordBatch>>> {
        Ok(None)
    }

    /// Bytes the view's rows take in memory.
    fn memory_bytes(&self) -> usize {
        0
    }

    /// Whether the view only ever gains rows (by its plan), so its row store can key rows
    /// by arrival instead of by content.
    fn append_only(&self) -> bool {
        false
    }

    /// Loads rows, before the first commit.
    fn restore_rows(&mut self, _rows: Vec<RecordBatch>) -> Result<()> {
        Err(crate::error::Error::Internal("this sink keeps no checkpointed rows".into()))
    }

    /// What exactly-once sinks have yet to deliver, for a checkpoint (`None`: no such sink).
    fn outbox_state(&mut self) -> Result<Option<Vec<u8>>> {
        Ok(None)
    }

    /// Loads what [`EpochSink::outbox_state`] wrote, before the first commit.
    fn restore_outbox(&mut self, _state: &[u8]) -> Result<()> {
        Err(crate::error::Error::Internal("this sink has no outboxes".into()))
    }
}

/// The tags a view's checkpoint state starts with: its rows whole, its rows as a row
/// store's files, or the outboxes of exactly-once sinks followed by one of the other two.
const ROWS_WHOLE: u64 = 0;
const ROWS_STORE: u64 = 1;
const OUTBOXES: u64 = 2;
/// A row store of an append-only view: rows keyed by their arrival.
const ROWS_APPENDED: u64 = 3;

/// Rows at least this large are checkpointed into a local store of row counts, so later
/// checkpoints upload only the files holding what changed.
const INCREMENTAL_FROM: usize = 1 << 20;
/// Changes waiting for the next checkpoint beyond this many rows (checkpoints failing or
/// stopped) are dropped, and the next checkpoint writes the rows whole again.
const PENDING_MAX: usize = 4_000_000;

/// The view's rows kept in a [`SpillStore`] for incremental checkpoints, with the changes
/// committed since the last one.
struct RowStore {
    disk: LocalStore,
    pending: Vec<ChangeBatch>,
    pending_rows: usize,
    layout: Layout,
}

/// How a row store keys the view's rows.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Layout {
    /// Encoded row → count: rows come and go.
    Counts,
    /// Arrival number (big-endian, so in key order) → encoded row: an append-only view's
    /// rows only arrive, so each new row is written without sorting or reading the store.
    Appended { next: u64 },
}

/// Buffers changes until the barrier, then commits them to the sink.
pub struct MaterializeOperator {
    schema: SchemaRef,
    buffered: Vec<ChangeBatch>,
    sink: Box<dyn EpochSink>,
    /// Where large views' rows are checkpointed incrementally (set by the runtime).
    rows: Option<RowStore>,
}

impl MaterializeOperator {
    pub fn new(schema: SchemaRef, sink: Box<dyn EpochSink>) -> Self {
        MaterializeOperator { schema, buffered: Vec::new(), sink, rows: None }
    }

    fn converter(&self) -> Result<RowConverter> {
        Ok(RowConverter::new(self.schema.fields().iter().map(|f| SortField::new(f.data_type().clone())).collect())?)
    }

    /// Brings the row store up to the last commit: every row the first time, the pending
    /// changes after that. Returns false where rows stay whole in the checkpoint (a small
    /// view, or no local directory).
    fn sync_rows(&mut self) -> Result<bool> {
        let converter = self.converter()?;
        let Some(rows) = &mut self.rows else { return Ok(false) };
        if rows.disk.store.is_none() {
            if self.sink.memory_bytes() < INCREMENTAL_FROM {
                return Ok(false);
            }
            let Some(batches) = self.sink.rows()? else { return Ok(false) };
            let store = SpillStore::create(&rows.disk.local.dir)?;
            let encoded =
                batches.iter().map(|b| converter.convert_columns(b.columns())).collect::<Result<Vec<_>, _>>()?;
            if self.sink.append_only() {
                let all = encoded.iter().flat_map(|rows| rows.iter().map(|row| row.data()));
                rows.layout = Layout::Appended { next: append(&store, 0, all)? };
                rows.disk.store = Some(store);
                rows.pending.clear();
                rows.pending_rows = 0;
                return Ok(true);
            }
            rows.layout = Layout::Counts;
            // Sorted, equal rows are neighbours: each run is one row and its count, and
            // the store takes them in key order.
            let mut sorted: Vec<&[u8]> = encoded.iter().flat_map(|rows| rows.iter().map(|row| row.data())).collect();
            sorted.sort_unstable();
            let values: Vec<(&[u8], [u8; 8])> =
                sorted.chunk_by(|a, b| a == b).map(|run| (run[0], (run.len() as i64).to_le_bytes())).collect();
            store.write(values.iter().map(|(k, n)| (*k, Some(n.as_slice()))))?;
            rows.disk.store = Some(store);
            rows.pending.clear();
            rows.pending_rows = 0;
            return Ok(true);
        }
        let pending = std::mem::take(&mut rows.pending);
        rows.pending_rows = 0;
        let store =
            rows.disk.store.as_ref().ok_or_else(|| crate::error::Error::Internal("row store vanished".into()))?;
        if pending.is_empty() {
            return Ok(true);
        }
        if let Layout::Appended { next } = rows.layout {
            if pending.iter().any(ChangeBatch::has_retractions) {
                return Err(crate::error::Error::Internal("an append-only view's rows were retracted".into()));
            }
            let encoded = pending
                .iter()
                .map(|part| converter.convert_columns(part.batch().columns()))
                .collect::<Result<Vec<_>, _>>()?;
            let arrived = encoded.iter().zip(&pending).flat_map(|(rows, part)| {
                rows.iter()
                    .zip(part.weights().values())
                    .flat_map(|(row, &w)| std::iter::repeat_n(row.data(), w as usize))
            });
            rows.layout = Layout::Appended { next: append(store, next, arrived)? };
            return Ok(true);
        }
        let change = ChangeBatch::concat(&self.schema, &pending)?;
        let change = change.consolidate()?;
        let encoded = converter.convert_columns(change.batch().columns())?;
        let mut values = Vec::with_capacity(change.num_rows());
        for (row, weight) in encoded.iter().zip(change.weights().values()) {
            let before = match store.get(row.as_ref())? {
                Some(bytes) => {
                    i64::from_le_bytes(bytes.as_slice().try_into().map_err(|_| crate::error::Error::Corrupt {
                        location: "a view's row store".into(),
                        reason: "a count is not 8 bytes".into(),
                    })?)
                }
                None => 0,
            };
            let after = before + weight;
            values.push((Box::<[u8]>::from(row.as_ref()), (after != 0).then(|| after.to_le_bytes())));
        }
        store.write(values.iter().map(|(k, n)| (k.as_ref(), n.as_ref().map(|n| n.as_slice()))))?;
        Ok(true)
    }
}

#[async_trait]
impl Operator for MaterializeOperator {
    fn name(&self) -> &str {
        "materialize"
    }

    async fn process(&mut self, _port: usize, input: ChangeBatch, _out: &mut Output) -> Result<()> {
        self.buffered.push(input);
        Ok(())
    }

    async fn on_barrier(&mut self, barrier: &Barrier, _out: &mut Output) -> Result<()> {
        let mut parts = std::mem::take(&mut self.buffered);
        parts.retain(|part| part.num_rows() > 0);
        // Only retractions can cancel out: an epoch of insertions is already its own net
        // change (a row inserted twice is two rows either way), so it skips the row
        // encoding consolidation costs, and the copy into one batch.
        if parts.iter().any(ChangeBatch::has_retractions) {
            let change = ChangeBatch::concat(&self.schema, &parts)?.consolidate()?;
            parts = if change.num_rows() > 0 { vec![change] } else { Vec::new() };
        }
        if let Some(rows) = &mut self.rows
            && rows.disk.store.is_some()
            && !parts.is_empty()
        {
            rows.pending_rows += parts.iter().map(ChangeBatch::num_rows).sum::<usize>();
            rows.pending.extend(parts.iter().cloned());
            if rows.pending_rows > PENDING_MAX {
                // No checkpoint for a long while: start over with the rows whole.
                rows.disk.store = None;
                rows.pending.clear();
                rows.pending_rows = 0;
            }
        }
        self.sink.commit(barrier, parts)
    }

    /// The view's rows, preceded by the outboxes of its exactly-once sinks if it has any.
    fn checkpoint(&mut self) -> Result<Option<Vec<u8>>> {
        let Some(rows) = self.checkpoint_rows()? else { return Ok(None) };
        let Some(outboxes) = self.sink.outbox_state()? else { return Ok(Some(rows)) };
        let mut w = StateWriter::with_capacity(outboxes.len() + rows.len() + 24);
        w.u64(OUTBOXES);
        w.bytes(&outboxes);
        w.bytes(&rows);
        Ok(Some(w.finish()))
    }

    fn checkpoint_files(&mut self) -> Vec<StateFile> {
        self.rows.as_mut().map(|r| r.disk.take_files()).unwrap_or_default()
    }

    fn set_local_state(&mut self, local: LocalState) {
        let (pending, pending_rows, layout) = (Vec::new(), 0, Layout::Counts);
        self.rows = Some(RowStore { disk: LocalStore::new(local), pending, pending_rows, layout });
    }

    fn restore_files(&mut self, dir: std::path::PathBuf) -> Result<()> {
        let rows = self
            .rows
            .as_mut()
            .ok_or_else(|| crate::error::Error::Internal("restoring files without a local directory".into()))?;
        rows.disk.set_restored_files(dir);
        Ok(())
    }

    fn restore(&mut self, state: &[u8]) -> Result<()> {
        if state.starts_with(&OUTBOXES.to_le_bytes()) {
            let mut r = StateReader::new(state, "a view with exactly-once sinks");
            r.u64()?;
            self.sink.restore_outbox(r.bytes()?)?;
            let rows = r.bytes()?;
            r.finish()?;
            return self.restore_checkpointed_rows(rows);
        }
        self.restore_checkpointed_rows(state)
    }
}

impl MaterializeOperator {
    /// The view's rows for a checkpoint: whole for a small view, else as the files of its
    /// row store (checkpoints come after the epoch's commit, so nothing is buffered).
    fn checkpoint_rows(&mut self) -> Result<Option<Vec<u8>>> {
        let synced = self.sync_rows().inspect_err(|_| {
            // The pending changes are gone and the store may hold part of them: the next
            // checkpoint starts over with the rows whole rather than from a stale store.
            if let Some(rows) = &mut self.rows {
                rows.disk.store = None;
            }
        })?;
        if !synced {
            let Some(state) = self.sink.checkpoint()? else { return Ok(None) };
            let mut bytes = Vec::with_capacity(state.len() + 8);
            bytes.extend_from_slice(&ROWS_WHOLE.to_le_bytes());
            bytes.extend_from_slice(&state);
            return Ok(Some(bytes));
        }
        let rows = self.rows.as_mut().ok_or_else(|| crate::error::Error::Internal("row store vanished".into()))?;
        let mut w = StateWriter::default();
        w.u64(match rows.layout {
            Layout::Counts => ROWS_STORE,
            Layout::Appended { .. } => ROWS_APPENDED,
        });
        rows.disk.checkpoint_into(&mut w)?;
        Ok(Some(w.finish()))
    }

    /// Restores what [`MaterializeOperator::checkpoint_rows`] wrote.
    fn restore_checkpointed_rows(&mut self, state: &[u8]) -> Result<()> {
        let (tag, rest) = state.split_at_checked(8).ok_or_else(|| crate::error::Error::Corrupt {
            location: "checkpointed rows of a view".into(),
            reason: "truncated".into(),
        })?;
        if tag == ROWS_WHOLE.to_le_bytes() {
            return self.sink.restore(rest);
        }
        let mut r = StateReader::new(state, "the row store of a view");
        let appended = r.u64()? == ROWS_APPENDED;
        let converter = self.converter()?;
        let rows = self
            .rows
            .as_mut()
            .ok_or_else(|| crate::error::Error::Internal("restoring a row store without a local directory".into()))?;
        let store = rows.disk.restore_from(&mut r)?;
        r.finish()?;
        // Rebuild the rows in batches of encoded rows, each repeated by its count.
        let parser = converter.parser();
        let mut batches = Vec::new();
        let mut chunk: Vec<(Box<[u8]>, i64)> = Vec::new();
        let mut flush = |chunk: &mut Vec<(Box<[u8]>, i64)>| -> Result<()> {
            if chunk.is_empty() {
                return Ok(());
            }
            let rows = chunk.iter().flat_map(|(k, n)| std::iter::repeat_n(parser.parse(k), (*n).max(0) as usize));
            let columns = converter.convert_rows(rows)?;
            batches.push(RecordBatch::try_new(self.schema.clone(), columns)?);
            chunk.clear();
            Ok(())
        };
        let corrupt = |reason: &str| crate::error::Error::Corrupt {
            location: "a view's row store".into(),
            reason: reason.to_string(),
        };
        let mut next = 0;
        for entry in store.entries() {
            let (key, value) = entry?;
            if appended {
                // Keyed by arrival: the value is the row.
                let number: [u8; 8] =
                    key.as_ref().try_into().map_err(|_| corrupt("an arrival number is not 8 bytes"))?;
                next = u64::from_be_bytes(number) + 1;
                chunk.push((value, 1));
            } else {
                let count: [u8; 8] = value.as_ref().try_into().map_err(|_| corrupt("a count is not 8 bytes"))?;
                chunk.push((key, i64::from_le_bytes(count)));
            }
            if chunk.len() == 8192 {
                flush(&mut chunk)?;
            }
        }
        flush(&mut chunk)?;
        rows.layout = if appended { Layout::Appended { next } } else { Layout::Counts };
        self.sink.restore_rows(batches)
    }
}

/// Writes `arrived` rows to an append-only view's row store under the arrival numbers from
/// `next` on; returns the number after the last.
fn append<'a>(store: &SpillStore, next: u64, arrived: impl IntoIterator<Item = &'a [u8]>) -> Result<u64> {
    let rows: Vec<&[u8]> = arrived.into_iter().collect();
    let keys: Vec<[u8; 8]> = (next..next + rows.len() as u64).map(u64::to_be_bytes).collect();
    store.write(keys.iter().zip(&rows).map(|(key, row)| (key.as_slice(), Some(*row))))?;
    Ok(next + rows.len() as u64)
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use datafusion::arrow::array::Int64Array;
    use datafusion::arrow::datatypes::{DataType, Field, Schema};

    use super::*;
    use crate::dataflow::operators::testing::checkpointed_and_restored;
    use crate::state::spill::MemoryPool;

    /// An append-only view's rows, kept as the catalog's sink keeps them.
    #[derive(Clone, Default)]
    struct Rows(Arc<Mutex<Vec<RecordBatch>>>);

    impl EpochSink for Rows {
        fn commit(&mut self, _barrier: &Barrier, parts: Vec<ChangeBatch>) -> Result<()> {
            for part in parts {
                let (inserts, _) = part.split()?;
                self.0.lock().expect("rows").push(inserts);
            }
            Ok(())
        }

        fn rows(&self) -> Result<Option<Vec<RecordBatch>>> {
            Ok(Some(self.0.lock().expect("rows").clone()))
        }

        fn memory_bytes(&self) -> usize {
            INCREMENTAL_FROM // large enough to go through the row store
        }

        fn append_only(&self) -> bool {
            true
        }

        fn restore_rows(&mut self, rows: Vec<RecordBatch>) -> Result<()> {
            *self.0.lock().expect("rows") = rows;
            Ok(())
        }
    }

    /// Gives `change` to `operator` and ends epoch `epoch` with a checkpoint barrier.
    async fn commit(operator: &mut MaterializeOperator, change: ChangeBatch, epoch: u64) {
        let mut out = Output::default();
        operator.process(0, change, &mut out).await.expect("process");
        let barrier = Barrier { epoch, checkpoint: true, mutation: None };
        operator.on_barrier(&barrier, &mut out).await.expect("barrier");
    }

    fn values(rows: &Rows) -> Vec<i64> {
        let batches = rows.0.lock().expect("rows");
        let mut values: Vec<i64> = batches
            .iter()
            .flat_map(|b| b.column(0).as_any().downcast_ref::<Int64Array>().expect("ints").values().to_vec())
            .collect();
        values.sort();
        values
    }

    /// A checkpoint that fails while bringing the row store up to date leaves no stale
    /// store behind: the next checkpoint writes the rows whole, and they restore.
    #[tokio::test]
    async fn a_failed_row_store_update_starts_the_next_checkpoint_over_whole() {
        let dir = tempfile::tempdir().expect("temp dir");
        let pool = MemoryPool::new(None);
        let local = |name: &str| LocalState { dir: dir.path().join(name), pool: pool.clone(), owner: (1, 0) };
        let schema = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
        let change = |values: Vec<i64>, weight: i64| {
            let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(Int64Array::from(values.clone()))]);
            ChangeBatch::try_new(batch.expect("batch"), Int64Array::from(vec![weight; values.len()])).expect("change")
        };
        let rows = Rows::default();
        let mut operator = MaterializeOperator::new(schema.clone(), Box::new(rows.clone()));
        operator.set_local_state(local("a"));
        commit(&mut operator, change((0..1000).collect(), 1), 1).await;
        operator.checkpoint().expect("the first checkpoint writes every row").expect("rows");
        commit(&mut operator, change((1000..1100).collect(), 1), 2).await;
        // A retraction the plan said cannot come fails the checkpoint …
        commit(&mut operator, change(vec![5], -1), 3).await;
        assert!(operator.checkpoint().is_err(), "a retraction in an append-only row store is refused");
        // … and the next one starts over from the rows the view holds.
        commit(&mut operator, change((1100..1200).collect(), 1), 4).await;
        let restored = Rows::default();
        let fresh = MaterializeOperator::new(schema.clone(), Box::new(restored.clone()));
        let _ = checkpointed_and_restored(operator, dir.path(), local("b"), fresh);
        assert_eq!(values(&restored), values(&rows), "the restored rows are the view's rows");
        assert_eq!(values(&rows).len(), 1200, "every row the view holds");
    }
}
