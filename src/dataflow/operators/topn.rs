//! [`TopNOperator`]: `ORDER BY … LIMIT n [OFFSET m]`, and top-N per group:
//! `row_number() OVER (PARTITION BY … ORDER BY …) <= n`.
//!
//! Keeps every input row in an ordered multiset per partition (by the encoded sort key,
//! then the whole row, so ties are broken the same way every time) and, at each barrier,
//! emits for each changed partition the difference between the rows now in positions
//! `[offset, offset + limit)` and the rows it emitted before. With a row number, a row
//! whose rank moved is retracted with its old number and inserted with its new one. A
//! change costs O(log n); a barrier costs O(offset + limit) per changed partition.
//!
//! Over input that only ever gains rows (`append_only`), a row pushed past position
//! `offset + limit` can never come back: rows only push it further down. Such rows are
//! dropped at each barrier, so a partition holds at most `offset + limit` rows, and a
//! retraction reaching the operator is an internal error rather than a wrong answer.
//!
//! With PARTITION BY, partitions spill whole to the operator's local store, least
//! recently changed first, when the memory pool is over its limit; a change to a spilled
//! partition reads it back. A global top-N is one partition and stays in memory.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::{Int64Array, RecordBatchOptions, UInt64Array};
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::arrow::row::{RowConverter, SortField};
use datafusion::physical_plan::PhysicalExpr;

use crate::dataflow::checkpoint::{LocalStore, StateReader, StateWriter};
use crate::dataflow::operator::{Barrier, Operator, Output};
use crate::dataflow::{ChangeBatch, FastMap, FastSet, Watermark};
use crate::error::{Error, Result};
use crate::state::spill::{LocalState, StateFile};

/// Key of the ordered multiset: encoded sort key, then the encoded row.
type Entry = (Box<[u8]>, Box<[u8]>);

/// The rows of one partition (all rows when there is no PARTITION BY).
struct Group {
    ordered: BTreeMap<Entry, i64>,
    /// What was emitted: (encoded row, rank or 0) → multiplicity.
    emitted: HashMap<(Box<[u8]>, u64), i64>,
    /// Estimated bytes it takes in memory, its partition key included.
    bytes: usize,
    /// The barrier count when it last changed, to spill the least recently used first.
    used: u64,
    /// Its spilled copy, if it has one, equals it: spilling it again writes nothing.
    synced: bool,
}

/// Estimated bytes of a partition apart from its rows: the index entry and the key.
fn group_bytes(key: &[u8]) -> usize {
    160 + key.len()
}

/// Estimated bytes of one ordered row (sort key and row) or emitted row.
fn entry_bytes(sort: &[u8], row: &[u8]) -> usize {
    64 + sort.len() + row.len()
}

impl Group {
    fn new(key: &[u8], clock: u64) -> Group {
        let bytes = group_bytes(key);
        Group { ordered: BTreeMap::new(), emitted: HashMap::new(), bytes, used: clock, synced: false }
    }

    /// Drops the rows past position `end`, which rows to come can only push further down
    /// (input that only gains rows); returns the bytes freed.
    fn drop_unreachable(&mut self, end: usize) -> usize {
        // Usually one row is past the ranks: pop from the end, which allocates nothing.
        let mut total: usize = self.ordered.values().map(|&count| count.max(0) as usize).sum();
        let mut freed = 0;
        while let Some(last) = self.ordered.last_entry() {
            let count = (*last.get()).max(0) as usize;
            // The last row starts at position `total - count`.
            if total - count < end {
                break;
            }
            total -= count;
            let ((sort, row), _) = last.remove_entry();
            freed += entry_bytes(&sort, &row);
        }
        self.bytes -= freed;
        if freed > 0 {
            self.synced = false;
        }
        freed
    }

    /// Its rows and what it emitted, in a checkpoint or as a spilled value.
    fn write(&self, w: &mut StateWriter) {
        w.u64(self.ordered.len() as u64);
        for ((sort, row), n) in &self.ordered {
            w.bytes(sort);
            w.bytes(row);
            w.i64(*n);
        }
        w.u64(self.emitted.len() as u64);
        for ((row, rank), n) in &self.emitted {
            w.bytes(row);
            w.u64(*rank);
            w.i64(*n);
        }
    }

    /// Reads what [`Group::write`] wrote, for partition `key`.
    fn read(r: &mut StateReader, key: &[u8], clock: u64) -> Result<Group> {
        let mut group = Group::new(key, clock);
        for _ in 0..r.len(24)? {
            let (sort, row) = (Box::<[u8]>::from(r.bytes()?), Box::<[u8]>::from(r.bytes()?));
            group.bytes += entry_bytes(&sort, &row);
            group.ordered.insert((sort, row), r.i64()?);
        }
        for _ in 0..r.len(24)? {
            let (row, rank) = (Box::<[u8]>::from(r.bytes()?), r.u64()?);
            group.bytes += entry_bytes(&[], &row);
            group.emitted.insert((row, rank), r.i64()?);
        }
        group.synced = true;
        Ok(group)
    }
}

/// How rows are ranked and which ranks are kept.
#[derive(Clone)]
pub struct TopNSpec {
    /// PARTITION BY expressions; empty for a global top-N.
    pub partition: Vec<Arc<dyn PhysicalExpr>>,
    pub partition_types: Vec<DataType>,
    pub sort: Vec<Arc<dyn PhysicalExpr>>,
    /// Each sort expression's type and direction.
    pub sort_fields: Vec<SortField>,
    pub offset: usize,
    pub limit: usize,
    /// Append the row number (1-based, per partition) as the last output column.
    pub numbered: bool,
    /// The input never retracts a row (by its plan): rows past the kept ranks are dropped.
    pub append_only: bool,
}

pub struct TopNOperator {
    spec: TopNSpec,
    /// `None` without PARTITION BY: every row is in one group.
    partition_converter: Option<RowConverter>,
    sort_converter: RowConverter,
    /// Encodes input rows.
    rows: RowConverter,
    schema: SchemaRef,
    /// The partitions in memory (all of them until some spill).
    groups: FastMap<Box<[u8]>, Group>,
    dirty: FastSet<Box<[u8]>>,
    /// Estimated bytes of `groups`.
    memory: usize,
    /// Barriers seen.
    clock: u64,
    /// Where partitions spill (set by the runtime; unset in unit tests). Its store opens
    /// when partitions first spill, or when a checkpoint first goes through it.
    spill: Option<LocalStore>,
    /// Once partitions may have copies in the store: those that emptied since it was
    /// last written, whose copies are to be deleted.
    emptied: Option<Vec<Box<[u8]>>>,
    /// Said once that the state is over the memory limit but cannot spill.
    warned: bool,
}

/// A partition to write with its value, or to delete (`None`).
type KeyWrite = (Box<[u8]>, Option<Vec<u8>>);

/// A state at least this large is checkpointed into the spill store (so later checkpoints
/// upload only what changed) rather than written whole each time.
const INCREMENTAL_FROM: usize = 4 << 20;

impl TopNOperator {
    /// `schema` is the output: the input columns, plus the row number when `numbered`.
    pub fn new(spec: TopNSpec, schema: SchemaRef) -> Result<Self> {
        let input_width = schema.fields().len() - usize::from(spec.numbered);
        let rows = RowConverter::new(
            schema.fields().iter().take(input_width).map(|f| SortField::new(f.data_type().clone())).collect(),
        )?;
        Ok(TopNOperator {
            partition_converter: match spec.partition.is_empty() {
                true => None,
                false => Some(RowConverter::new(spec.partition_types.iter().cloned().map(SortField::new).collect())?),
            },
            sort_converter: RowConverter::new(spec.sort_fields.clone())?,
            rows,
            schema,
            spec,
            groups: FastMap::default(),
            dirty: FastSet::default(),
            memory: 0,
            clock: 0,
            spill: None,
            emptied: None,
            warned: false,
        })
    }

    /// Whether partitions can spill: only with PARTITION BY.
    fn spillable(&self) -> bool {
        !self.spec.partition.is_empty()
    }

    /// Opens the spill store if need be; from then on, emptied partitions are deleted
    /// from it.
    fn open_store(&mut self) -> Result<()> {
        let Some(spill) = &mut self.spill else {
            return Err(Error::Internal("a top-N spills without a local directory".into()));
        };
        spill.open("top-N state")?;
        self.emptied.get_or_insert_default();
        Ok(())
    }

    /// Writes to the spill store (which must be open): deletes of the partitions that
    /// emptied, then those of `keys` (every one in memory if `None`) whose spilled copies
    /// are stale.
    fn sync(&mut self, keys: Option<&[Box<[u8]>]>) -> Result<()> {
        let emptied = self.emptied.as_mut().map(std::mem::take).unwrap_or_default();
        let mut entries: Vec<KeyWrite> = emptied.into_iter().map(|key| (key, None)).collect();
        let mut write = |key: &[u8], group: &mut Group| {
            if !group.synced {
                group.synced = true;
                let mut w = StateWriter::with_capacity(group.bytes);
                group.write(&mut w);
                entries.push((key.into(), Some(w.finish())));
            }
        };
        match keys {
            None => self.groups.iter_mut().for_each(|(key, group)| write(key, group)),
            Some(keys) => {
                for key in keys {
                    if let Some(group) = self.groups.get_mut(key) {
                        write(key, group);
                    }
                }
            }
        }
        let store = self.spill.as_ref().and_then(|s| s.store.as_ref());
        let store = store.ok_or_else(|| Error::Internal("writing partitions without a spill store".into()))?;
        store.write(entries.iter().map(|(key, value)| (key.as_ref(), value.as_deref())))
    }

    /// Moves the least recently changed partitions to the spill store until memory is at
    /// most `target` bytes.
    fn evict(&mut self, target: usize) -> Result<()> {
        if !self.spillable() {
            if !self.warned {
                self.warned = true;
                tracing::warn!("over the memory limit, but a top-N without PARTITION BY cannot spill");
            }
            return Ok(());
        }
        self.open_store()?;
        let over = self.memory.saturating_sub(target);
        let mut by_use: Vec<(u64, &Box<[u8]>, usize)> =
            self.groups.iter().map(|(key, group)| (group.used, key, group.bytes)).collect();
        by_use.sort_unstable_by_key(|(used, ..)| *used);
        let mut freed = 0;
        let victims: Vec<Box<[u8]>> = by_use
            .into_iter()
            .take_while(|(.., bytes)| {
                let more = freed < over;
                freed += bytes;
                more
            })
            .map(|(_, key, _)| key.clone())
            .collect();
        self.sync(Some(&victims))?;
        for key in victims {
            if let Some(group) = self.groups.remove(&key) {
                self.memory -= group.bytes;
            }
        }
        Ok(())
    }

    /// Brings partition `key` back from the spill store if it spilled.
    fn load_spilled(&mut self, key: &[u8]) -> Result<()> {
        let Some(store) = self.spill.as_ref().and_then(|s| s.store.as_ref()) else { return Ok(()) };
        if self.groups.contains_key(key) {
            return Ok(());
        }
        let Some(value) = store.get(key)? else { return Ok(()) };
        let mut r = StateReader::new(&value, "a spilled top-N partition");
        let group = Group::read(&mut r, key, self.clock)?;
        r.finish()?;
        self.memory += group.bytes;
        self.groups.insert(key.into(), group);
        Ok(())
    }

    fn evaluate(
        exprs: &[Arc<dyn PhysicalExpr>],
        converter: &RowConverter,
        batch: &RecordBatch,
    ) -> Result<datafusion::arrow::row::Rows> {
        let columns = exprs
            .iter()
            .map(|e| e.evaluate(batch).and_then(|v| v.into_array(batch.num_rows())))
            .collect::<datafusion::error::Result<Vec<_>>>()?;
        Ok(converter.convert_columns(&columns)?)
    }

    /// Deletes the spilled copies of emptied partitions, and spills partitions if the
    /// memory pool is over its limit.
    fn spill_if_over(&mut self) -> Result<()> {
        let Some(spill) = &self.spill else { return Ok(()) };
        if spill.store.is_some() {
            self.sync(Some(&[]))?;
        }
        let Some(target) = self.spill.as_ref().and_then(|spill| spill.report(self.memory)) else { return Ok(()) };
        self.evict(target)?;
        if let Some(spill) = &self.spill {
            spill.report(self.memory);
        }
        Ok(())
    }

    /// The rows now in positions `[offset, offset + limit)` of `group`, with their ranks.
    fn current(&self, group: &Group) -> HashMap<(Box<[u8]>, u64), i64> {
        let mut current = HashMap::new();
        let (offset, end) = (self.spec.offset, self.spec.offset.saturating_add(self.spec.limit));
        let mut position = 0usize;
        for ((_, row), count) in &group.ordered {
            if position >= end {
                break;
            }
            let first = position.max(offset);
            position = position.saturating_add(*count as usize);
            let last = position.min(end);
            if self.spec.numbered {
                for p in first..last {
                    current.insert((row.clone(), p as u64 + 1), 1);
                }
            } else if last > first {
                *current.entry((row.clone(), 0)).or_insert(0) += (last - first) as i64;
            }
        }
        current
    }
}

#[async_trait]
impl Operator for TopNOperator {
    fn name(&self) -> &str {
        if self.spec.partition.is_empty() { "top_n" } else { "top_n_per_group" }
    }

    /// Every partition's ordered rows and what it emitted (nothing is dirty after a
    /// barrier). Once partitions have spilled, or the state is large, they go into the
    /// spill store instead and the state lists its files, so a checkpoint uploads only
    /// files no earlier one did.
    fn checkpoint(&mut self) -> Result<Option<Vec<u8>>> {
        let spilled = self.spill.as_ref().is_some_and(|s| s.store.is_some());
        let through_store = self.spill.is_some() && self.spillable() && (spilled || self.memory >= INCREMENTAL_FROM);
        let mut w = StateWriter::with_capacity(if through_store { 4096 } else { self.memory });
        w.u64(through_store as u64);
        if through_store {
            self.open_store()?;
            self.sync(None)?;
            let spill = self.spill.as_mut().ok_or_else(|| Error::Internal("spill store vanished".into()))?;
            spill.checkpoint_into(&mut w)?;
            return Ok(Some(w.finish()));
        }
        w.u64(self.groups.len() as u64);
        for (partition, group) in &self.groups {
            w.bytes(partition);
            group.write(&mut w);
        }
        Ok(Some(w.finish()))
    }

    fn checkpoint_files(&mut self) -> Vec<StateFile> {
        self.spill.as_mut().map(LocalStore::take_files).unwrap_or_default()
    }

    fn set_local_state(&mut self, local: LocalState) {
        self.spill = Some(LocalStore::new(local));
    }

    fn restore_files(&mut self, dir: std::path::PathBuf) -> Result<()> {
        let spill =
            self.spill.as_mut().ok_or_else(|| Error::Internal("restoring files without a local directory".into()))?;
        spill.set_restored_files(dir);
        Ok(())
    }

    fn restore(&mut self, state: &[u8]) -> Result<()> {
        let mut r = StateReader::new(state, "a top-N");
        self.groups.clear();
        self.dirty.clear();
        self.memory = 0;
        if r.u64()? != 0 {
            let spill = self
                .spill
                .as_mut()
                .ok_or_else(|| Error::Internal("restoring spilled state without a local directory".into()))?;
            spill.restore_from(&mut r)?;
            self.emptied = Some(Vec::new());
            return r.finish();
        }
        for _ in 0..r.len(24)? {
            let partition: Box<[u8]> = Box::from(r.bytes()?);
            let group = Group::read(&mut r, &partition, self.clock)?;
            self.memory += group.bytes;
            self.groups.insert(partition, group);
        }
        r.finish()
    }

    async fn process(&mut self, _port: usize, input: ChangeBatch, _out: &mut Output) -> Result<()> {
        let batch = input.batch();
        let groups = match &self.partition_converter {
            Some(converter) => Some(Self::evaluate(&self.spec.partition, converter, batch)?),
            None => None,
        };
        let keys = Self::evaluate(&self.spec.sort, &self.sort_converter, batch)?;
        let rows = self.rows.convert_columns(batch.columns())?;
        let end = self.spec.offset.saturating_add(self.spec.limit);
        for i in 0..batch.num_rows() {
            // Over input that only gains rows, a row that sorts at or after the last of a
            // partition already holding `end` rows lands past position `end`: it can never
            // be among the ranks, so it is not kept at all.
            if self.spec.append_only
                && let Some(group) = self.groups.get(groups.as_ref().map_or(&[][..], |g| g.row(i).data()))
                && group.ordered.len() >= end
                && let Some(((sort, row), _)) = group.ordered.last_key_value()
                && (keys.row(i).data(), rows.row(i).data()) >= (sort.as_ref(), row.as_ref())
                && input.weights().value(i) >= 0
            {
                continue;
            }
            let group_key: Box<[u8]> = groups.as_ref().map(|g| g.row(i).as_ref().into()).unwrap_or_default();
            self.load_spilled(&group_key)?;
            let clock = self.clock;
            if !self.groups.contains_key(&group_key) {
                let group = Group::new(&group_key, clock);
                self.memory += group.bytes;
                self.groups.insert(group_key.clone(), group);
            }
            let group =
                self.groups.get_mut(&group_key).ok_or_else(|| Error::Internal("top-N group vanished".into()))?;
            group.used = clock;
            group.synced = false;
            let weight = input.weights().value(i);
            if weight < 0 && self.spec.append_only {
                return Err(Error::Internal("a retraction reached a top-N over input that only gains rows".into()));
            }
            let entry: Entry = (keys.row(i).as_ref().into(), rows.row(i).as_ref().into());
            let size = entry_bytes(&entry.0, &entry.1);
            let count = match group.ordered.entry(entry) {
                std::collections::btree_map::Entry::Occupied(mut slot) => {
                    *slot.get_mut() += weight;
                    let count = *slot.get();
                    if count == 0 {
                        slot.remove();
                        group.bytes -= size;
                        self.memory -= size;
                    }
                    count
                }
                std::collections::btree_map::Entry::Vacant(slot) => {
                    if weight > 0 {
                        slot.insert(weight);
                        group.bytes += size;
                        self.memory += size;
                    }
                    weight
                }
            };
            if count < 0 {
                return Err(Error::Internal("top-N saw a retraction of a row it does not hold".into()));
            }
            self.dirty.insert(group_key);
        }
        Ok(())
    }

    /// A row can leave the top N at any time, whatever its event time: watermarks stop
    /// here.
    async fn on_watermark(&mut self, _port: usize, _watermark: Watermark, _out: &mut Output) -> Result<()> {
        Ok(())
    }

    async fn on_barrier(&mut self, _barrier: &Barrier, out: &mut Output) -> Result<()> {
        let mut changes: Vec<(Box<[u8]>, u64, i64)> = Vec::new();
        for key in std::mem::take(&mut self.dirty) {
            if self.spec.append_only
                && let Some(group) = self.groups.get_mut(&key)
            {
                self.memory -= group.drop_unreachable(self.spec.offset.saturating_add(self.spec.limit));
            }
            let Some(group) = self.groups.get(&key) else { continue };
            let current = self.current(group);
            let group = self.groups.get_mut(&key).ok_or_else(|| Error::Internal("top-N group vanished".into()))?;
            for ((row, rank), count) in &current {
                let before = group.emitted.get(&(row.clone(), *rank)).copied().unwrap_or(0);
                if *count != before {
                    changes.push((row.clone(), *rank, count - before));
                }
            }
            for ((row, rank), before) in &group.emitted {
                if !current.contains_key(&(row.clone(), *rank)) {
                    changes.push((row.clone(), *rank, -before));
                }
            }
            let emitted_bytes = |emitted: &HashMap<(Box<[u8]>, u64), i64>| -> usize {
                emitted.keys().map(|(row, _)| entry_bytes(&[], row)).sum()
            };
            let (before, after) = (emitted_bytes(&group.emitted), emitted_bytes(&current));
            group.bytes = group.bytes + after - before;
            self.memory = self.memory + after - before;
            group.emitted = current;
            if group.ordered.is_empty() && group.emitted.is_empty() {
                if let Some(group) = self.groups.remove(&key) {
                    self.memory -= group.bytes;
                }
                if let Some(emptied) = &mut self.emptied {
                    emptied.push(key);
                }
            }
        }
        self.clock += 1;
        self.spill_if_over()?;
        if changes.is_empty() {
            return Ok(());
        }
        let parser = self.rows.parser();
        let mut columns = self.rows.convert_rows(changes.iter().map(|(row, _, _)| parser.parse(row)))?;
        if self.spec.numbered {
            columns.push(Arc::new(UInt64Array::from(changes.iter().map(|(_, rank, _)| *rank).collect::<Vec<_>>())));
        }
        let options = RecordBatchOptions::new().with_row_count(Some(changes.len()));
        let batch = RecordBatch::try_new_with_options(self.schema.clone(), columns, &options)?;
        let weights = Int64Array::from(changes.iter().map(|(_, _, w)| *w).collect::<Vec<_>>());
        out.push(ChangeBatch::try_new(batch, weights)?);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use datafusion::arrow::compute::SortOptions;
    use datafusion::arrow::datatypes::{Field, Schema};
    use datafusion::physical_expr::expressions::Column;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::dataflow::operators::testing::{checkpointed_and_restored, feed, random_change};
    use crate::state::spill::MemoryPool;

    /// `row_number() OVER (PARTITION BY k ORDER BY v DESC) <= 3` over (k, v) integers.
    fn top_three() -> TopNOperator {
        ranks(0, 3, false)
    }

    /// `row_number() OVER (PARTITION BY k ORDER BY v DESC) BETWEEN offset + 1 AND offset +
    /// limit` over (k, v) integers, for input that only gains rows if `append_only`.
    fn ranks(offset: usize, limit: usize, append_only: bool) -> TopNOperator {
        let spec = TopNSpec {
            partition: vec![Arc::new(Column::new("k", 0))],
            partition_types: vec![DataType::Int64],
            sort: vec![Arc::new(Column::new("v", 1))],
            sort_fields: vec![SortField::new_with_options(
                DataType::Int64,
                SortOptions { descending: true, nulls_first: false },
            )],
            offset,
            limit,
            numbered: true,
            append_only,
        };
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, false),
            Field::new("v", DataType::Int64, false),
            Field::new("n", DataType::UInt64, false),
        ]));
        TopNOperator::new(spec, schema).expect("top-N")
    }

    /// The oracle for spilling: a top-N per partition over a pool far too small for its
    /// partitions, restored from its checkpoint's files midway, emits exactly what one
    /// that keeps everything in memory emits, through inserts and deletes that reach
    /// spilled partitions and empty them.
    #[tokio::test]
    async fn spilled_and_restored_partitions_rank_as_partitions_in_memory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pool = MemoryPool::new(Some(32 << 10));
        let local = |name: &str| LocalState { dir: dir.path().join(name), pool: pool.clone(), owner: (1, 0) };
        let mut memory = top_three();
        let mut spilling = top_three();
        spilling.set_local_state(local("a"));
        let (mut expected, mut got) = (BTreeMap::new(), BTreeMap::new());
        let mut live: Vec<(i64, i64)> = Vec::new();
        let mut rng = rand::rngs::SmallRng::seed_from_u64(3);
        for round in 0..40 {
            let change = random_change(&mut rng, &mut live, (200, 1500, 100), 90);
            // Every third round, the next round's changes join this one's epoch.
            let barrier =
                (round % 3 != 0 || round == 39).then_some(Barrier { epoch: round, checkpoint: false, mutation: None });
            for (operator, into) in [(&mut memory, &mut expected), (&mut spilling, &mut got)] {
                feed(operator, 0, change.clone(), barrier.as_ref(), into).await;
            }
            assert_eq!(got, expected, "round {round}");
            if round == 20 {
                spilling = checkpointed_and_restored(spilling, dir.path(), local("b"), top_three());
            }
        }
        assert!(
            spilling.groups.len() * 2 < memory.groups.len(),
            "most partitions are spilled: {} of {} in memory",
            spilling.groups.len(),
            memory.groups.len()
        );
        assert!(spilling.memory <= 32 << 10, "memory stays within the pool's limit: {}", spilling.memory);
        assert!(expected.len() > 2000, "partitions have their top three: {} rows", expected.len());
    }

    /// Over rows that are only ever inserted, a top-N that drops the rows pushed past its
    /// ranks answers as the general one does, also across a checkpoint, and holds at most
    /// `offset + limit` rows per partition; a retraction, which the plan said cannot come,
    /// is an error and not a wrong answer.
    #[tokio::test]
    async fn append_only_ranks_drop_rows_pushed_past_them_and_answer_as_the_general_ones() {
        let input = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, false),
            Field::new("v", DataType::Int64, false),
        ]));
        let batch_of = |rows: &[(i64, i64)]| {
            RecordBatch::try_new(
                input.clone(),
                vec![
                    Arc::new(Int64Array::from(rows.iter().map(|r| r.0).collect::<Vec<_>>())),
                    Arc::new(Int64Array::from(rows.iter().map(|r| r.1).collect::<Vec<_>>())),
                ],
            )
            .expect("batch")
        };
        let (mut general, mut pruned) = (ranks(1, 3, false), ranks(1, 3, true));
        let (mut expected, mut got) = (BTreeMap::new(), BTreeMap::new());
        let mut rng = rand::rngs::SmallRng::seed_from_u64(5);
        for round in 0..30 {
            // Values repeat within a partition, so ties and rows inserted twice happen.
            let rows: Vec<(i64, i64)> = (0..400).map(|_| (rng.gen_range(0..300), rng.gen_range(0..40))).collect();
            let change = ChangeBatch::inserts(batch_of(&rows));
            let barrier = Barrier { epoch: round, checkpoint: false, mutation: None };
            for (operator, into) in [(&mut general, &mut expected), (&mut pruned, &mut got)] {
                feed(operator, 0, change.clone(), Some(&barrier), into).await;
            }
            assert_eq!(got, expected, "round {round}");
            if round == 15 {
                let state = pruned.checkpoint().expect("checkpoint").expect("checkpointable");
                pruned = ranks(1, 3, true);
                pruned.restore(&state).expect("restore");
            }
        }
        assert!(expected.len() >= 290 * 3, "partitions have their ranks 2 to 4: {} rows", expected.len());
        let held: usize = pruned.groups.values().map(|g| g.ordered.len()).max().unwrap_or(0);
        assert!(held <= 4, "a partition holds at most offset + limit rows: {held}");
        let all: usize = general.groups.values().map(|g| g.ordered.len()).sum();
        let kept: usize = pruned.groups.values().map(|g| g.ordered.len()).sum();
        assert!(kept * 5 < all, "the general top-N holds every row ({all}), this one few ({kept})");
        let mut out = Output::default();
        let retraction = ChangeBatch::retracts(batch_of(&[(1, 1)]));
        let refused = pruned.process(0, retraction, &mut out).await;
        assert!(matches!(refused, Err(Error::Internal(_))), "a retraction is refused: {refused:?}");
    }
}
