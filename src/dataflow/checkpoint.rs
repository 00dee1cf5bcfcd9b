//! Operator state at a checkpoint: how an operator writes what it holds into bytes and
//! reads it back, and how the runtime hands those bytes to whoever stores them.
//!
//! A checkpoint barrier reaches every operator of a view after all data before it (the
//! runtime aligns it), so the states taken there form one consistent cut: restoring them
//! and feeding the changes committed after the barrier gives exactly the view that running
//! on would have given. The bytes are freshet's own: an operator writes its maps with
//! [`StateWriter`] and checks everything it reads with [`StateReader`]; a truncated or
//! foreign state is an error, never a half-restored operator. This module knows nothing of
//! where states are stored (see `catalog::checkpoint`).

use std::collections::BTreeMap;
use std::sync::Arc;

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::ipc::reader::StreamReader;
use datafusion::arrow::ipc::writer::StreamWriter;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::arrow::row::{OwnedRow, RowConverter};

use super::FastMap;
use crate::error::{Error, Result};
use crate::state::spill::{LocalState, SpillStore, StateFile};

/// Receives the state an operator took at a checkpoint barrier: (epoch, the operator's
/// position in its view, the state, or `None` if the operator cannot be checkpointed, or
/// the error that stopped it).
pub type StateReport = Arc<dyn Fn(u64, usize, Result<Option<OperatorState>>) + Send + Sync>;

/// What one operator's checkpoint consists of: its bytes, and the files of its spilled
/// state they refer to (see [`crate::state::spill`]), which the checkpoint uploads unless
/// an earlier one did.
#[derive(Debug, Default)]
pub struct OperatorState {
    pub bytes: Vec<u8>,
    pub files: Vec<StateFile>,
}

/// Where one operator reports its checkpoint states.
#[derive(Clone)]
pub struct Checkpointing {
    /// The operator's position in its view (spawn order, which re-planning repeats).
    pub operator: usize,
    pub report: StateReport,
}

/// Writes what a [`crate::state::spill::SpillStore`] checkpoint consists of: its small
/// files whole, and its shared files as (name, object).
pub fn write_store_files(w: &mut StateWriter, small: &[(String, Vec<u8>)], files: &[StateFile]) {
    w.u64(small.len() as u64);
    for (name, bytes) in small {
        w.bytes(name.as_bytes());
        w.bytes(bytes);
    }
    w.u64(files.len() as u64);
    for file in files {
        w.bytes(file.name.as_bytes());
        w.bytes(file.object.as_bytes());
    }
}

/// Small files and shared files' (name → object) as [`write_store_files`] wrote them.
pub type StoreFiles = (Vec<(String, Vec<u8>)>, std::collections::HashMap<String, String>);

/// Reads what [`write_store_files`] wrote.
pub fn read_store_files(r: &mut StateReader) -> Result<StoreFiles> {
    let what = r.what;
    let text = |bytes: &[u8]| {
        String::from_utf8(bytes.to_vec())
            .map_err(|_| Error::Corrupt { location: what.to_string(), reason: "a file name is not UTF-8".into() })
    };
    let mut small = Vec::new();
    for _ in 0..r.len(16)? {
        let name = text(r.bytes()?)?;
        small.push((name, r.bytes()?.to_vec()));
    }
    let mut shared = std::collections::HashMap::new();
    for _ in 0..r.len(16)? {
        let name = text(r.bytes()?)?;
        shared.insert(name, text(r.bytes()?)?);
    }
    Ok((small, shared))
}

/// An operator's local [`SpillStore`] and the files its last checkpoint refers to: what
/// aggregates, joins, top-N and views share to keep state on local disk and checkpoint
/// it through that disk. The store opens on first use; dropping this removes its directory.
pub struct LocalStore {
    pub local: LocalState,
    pub store: Option<SpillStore>,
    /// The files of the last checkpoint, handed to the runtime.
    files: Vec<StateFile>,
    /// Where a checkpoint's files were downloaded, before [`crate::dataflow::operator::Operator::restore`].
    restored_files: Option<std::path::PathBuf>,
}

impl LocalStore {
    pub fn new(local: LocalState) -> LocalStore {
        LocalStore { local, store: None, files: Vec::new(), restored_files: None }
    }

    /// The store, created empty in the operator's directory if none is open; `what`
    /// names the state in the log line that says it went to disk.
    pub fn open(&mut self, what: &str) -> Result<&mut SpillStore> {
        let store = match self.store.take() {
            Some(store) => store,
            None => {
                tracing::info!(dir = %self.local.dir.display(), "{what} goes to local disk");
                SpillStore::create(&self.local.dir)?
            }
        };
        Ok(self.store.insert(store))
    }

    /// Checkpoints the open store and writes the files the checkpoint consists of.
    pub fn checkpoint_into(&mut self, w: &mut StateWriter) -> Result<()> {
        let store = self.store.as_mut().ok_or_else(|| Error::Internal("checkpointing a store not open".into()))?;
        let (small, files) = store.checkpoint()?;
        write_store_files(w, &small, &files);
        self.files = files;
        Ok(())
    }

    /// The files of the last checkpoint (once).
    pub fn take_files(&mut self) -> Vec<StateFile> {
        std::mem::take(&mut self.files)
    }

    /// A checkpoint's files were downloaded into `dir`.
    pub fn set_restored_files(&mut self, dir: std::path::PathBuf) {
        self.restored_files = Some(dir);
    }

    /// Opens the store a checkpoint wrote with [`LocalStore::checkpoint_into`], reading
    /// its file list from `r`.
    pub fn restore_from(&mut self, r: &mut StateReader) -> Result<&mut SpillStore> {
        let (small, shared) = read_store_files(r)?;
        let downloaded = match self.restored_files.take() {
            Some(dir) => dir,
            None => {
                let dir = self.local.dir.join("download");
                std::fs::create_dir_all(&dir)
                    .map_err(|e| Error::Storage(format!("creating {}: {e}", dir.display())))?;
                dir
            }
        };
        let store = SpillStore::restore(&self.local.dir, &downloaded, &small, shared)?;
        Ok(self.store.insert(store))
    }

    /// Reports `memory` bytes held in memory (and what the store holds) to the pool;
    /// returns what memory should shrink to if the pool is over its limit.
    pub fn report(&self, memory: usize) -> Option<usize> {
        let spilled = self.store.as_ref().map_or(0, |s| s.size());
        self.local.pool.report(self.local.owner, memory, spilled)
    }
}

impl Drop for LocalStore {
    fn drop(&mut self) {
        self.local.pool.forget(self.local.owner);
        self.store = None;
        let _ = std::fs::remove_dir_all(&self.local.dir);
    }
}

/// Appends integers and byte strings to a state.
#[derive(Default)]
pub struct StateWriter {
    bytes: Vec<u8>,
}

impl StateWriter {
    /// A writer with room for `bytes`, so a large state is not copied as it grows.
    pub fn with_capacity(bytes: usize) -> Self {
        StateWriter { bytes: Vec::with_capacity(bytes) }
    }

    pub fn u64(&mut self, value: u64) {
        self.bytes.extend_from_slice(&value.to_le_bytes());
    }

    pub fn i64(&mut self, value: i64) {
        self.bytes.extend_from_slice(&value.to_le_bytes());
    }

    pub fn i128(&mut self, value: i128) {
        self.bytes.extend_from_slice(&value.to_le_bytes());
    }

    pub fn f64(&mut self, value: f64) {
        self.bytes.extend_from_slice(&value.to_le_bytes());
    }

    /// An optional integer: a presence flag, then the value (0 when absent).
    pub fn opt_i64(&mut self, value: Option<i64>) {
        self.u64(value.is_some() as u64);
        self.i64(value.unwrap_or_default());
    }

    /// A byte string, length first.
    pub fn bytes(&mut self, value: &[u8]) {
        self.u64(value.len() as u64);
        self.bytes.extend_from_slice(value);
    }

    /// A map of byte strings to weights, entry count first.
    pub fn counts<'a>(&mut self, len: usize, entries: impl Iterator<Item = (&'a [u8], i64)>) {
        self.u64(len as u64);
        for (key, count) in entries {
            self.bytes(key);
            self.i64(count);
        }
    }

    pub fn finish(self) -> Vec<u8> {
        self.bytes
    }
}

/// Reads a state written by [`StateWriter`], failing on anything short or left over.
pub struct StateReader<'a> {
    bytes: &'a [u8],
    what: &'a str,
}

impl<'a> StateReader<'a> {
    /// `what` names the operator in errors.
    pub fn new(bytes: &'a [u8], what: &'a str) -> Self {
        StateReader { bytes, what }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.bytes.len() < n {
            return Err(Error::Corrupt {
                location: format!("checkpointed state of {}", self.what),
                reason: format!("it ends {} bytes early", n - self.bytes.len()),
            });
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut array = [0; N];
        array.copy_from_slice(self.take(N)?);
        Ok(array)
    }

    pub fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    pub fn i64(&mut self) -> Result<i64> {
        Ok(i64::from_le_bytes(self.array()?))
    }

    pub fn i128(&mut self) -> Result<i128> {
        Ok(i128::from_le_bytes(self.array()?))
    }

    pub fn f64(&mut self) -> Result<f64> {
        Ok(f64::from_le_bytes(self.array()?))
    }

    pub fn opt_i64(&mut self) -> Result<Option<i64>> {
        let present = self.u64()? != 0;
        let value = self.i64()?;
        Ok(present.then_some(value))
    }

    /// A count of entries that follow, each at least `min_entry` bytes long: checked
    /// against what is left, so a damaged count cannot make a reader allocate wildly.
    pub fn len(&mut self, min_entry: usize) -> Result<usize> {
        let n = self.u64()?;
        if n.saturating_mul(min_entry.max(1) as u64) > self.bytes.len() as u64 {
            return Err(Error::Corrupt {
                location: format!("checkpointed state of {}", self.what),
                reason: format!("it claims {n} entries but holds only {} bytes", self.bytes.len()),
            });
        }
        Ok(n as usize)
    }

    pub fn bytes(&mut self) -> Result<&'a [u8]> {
        let n = self.len(1)?;
        self.take(n)
    }

    /// A map written by [`StateWriter::counts`], as (key, count) pairs in written order.
    pub fn counts(&mut self) -> Result<Vec<(Box<[u8]>, i64)>> {
        let n = self.len(16)?;
        (0..n).map(|_| Ok((Box::from(self.bytes()?), self.i64()?))).collect()
    }

    /// Fails unless every byte was read.
    pub fn finish(self) -> Result<()> {
        if !self.bytes.is_empty() {
            return Err(Error::Corrupt {
                location: format!("checkpointed state of {}", self.what),
                reason: format!("{} bytes are left over", self.bytes.len()),
            });
        }
        Ok(())
    }
}

/// Rows held by event time (or expiry), as operators that release rows over time keep
/// them: each time, then its rows (row format) with their weights.
pub fn write_rows_by_time(w: &mut StateWriter, rows: &BTreeMap<i64, FastMap<OwnedRow, i64>>) {
    w.u64(rows.len() as u64);
    for (time, at) in rows {
        w.i64(*time);
        w.counts(at.len(), at.iter().map(|(row, n)| (row.as_ref(), *n)));
    }
}

/// Reads what [`write_rows_by_time`] wrote; `converter` encoded the rows.
pub fn read_rows_by_time(
    r: &mut StateReader,
    converter: &RowConverter,
) -> Result<BTreeMap<i64, FastMap<OwnedRow, i64>>> {
    let mut rows = BTreeMap::new();
    for _ in 0..r.len(16)? {
        let time = r.i64()?;
        let at: FastMap<OwnedRow, i64> =
            r.counts()?.into_iter().map(|(row, n)| (converter.parser().parse(&row).owned(), n)).collect();
        rows.insert(time, at);
    }
    Ok(rows)
}

/// Rows as an Arrow IPC stream, for states that are whole relations (a view's rows).
pub fn rows_to_bytes(schema: &SchemaRef, batches: &[RecordBatch]) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    let mut writer = StreamWriter::try_new(&mut bytes, schema)?;
    for batch in batches {
        writer.write(batch)?;
    }
    writer.finish()?;
    drop(writer);
    Ok(bytes)
}

/// Rows written by [`rows_to_bytes`].
pub fn rows_from_bytes(bytes: &[u8], what: &str) -> Result<Vec<RecordBatch>> {
    let corrupt = |e: datafusion::arrow::error::ArrowError| Error::Corrupt {
        location: format!("checkpointed rows of {what}"),
        reason: e.to_string(),
    };
    let reader = StreamReader::try_new(std::io::Cursor::new(bytes), None).map_err(corrupt)?;
    reader.map(|batch| batch.map_err(corrupt)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_reads_back_as_written() {
        let mut w = StateWriter::default();
        w.u64(7);
        w.i128(-3);
        w.f64(0.5);
        w.counts(2, [(&b"a"[..], 2), (&b"bc"[..], -1)].into_iter());
        let bytes = w.finish();
        let mut r = StateReader::new(&bytes, "test");
        assert_eq!(r.u64().expect("u64"), 7);
        assert_eq!(r.i128().expect("i128"), -3);
        assert_eq!(r.f64().expect("f64"), 0.5);
        assert_eq!(r.counts().expect("counts"), vec![(Box::from(&b"a"[..]), 2), (Box::from(&b"bc"[..]), -1)]);
        r.finish().expect("nothing left");
    }

    #[test]
    fn a_truncated_state_is_an_error_not_a_partial_restore() {
        let mut w = StateWriter::default();
        w.counts(1, [(&b"abc"[..], 1)].into_iter());
        let bytes = w.finish();
        let error = StateReader::new(&bytes[..bytes.len() - 3], "join").counts().expect_err("short");
        assert!(error.to_string().contains("join"), "{error}");
        let mut huge = StateWriter::default();
        huge.u64(u64::MAX);
        assert!(StateReader::new(&huge.finish(), "x").counts().is_err(), "a wild count is refused");
    }
}
