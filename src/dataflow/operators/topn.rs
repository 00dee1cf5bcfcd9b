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

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::{Int64Array, RecordBatchOptions, UInt64Array};
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::arrow::row::{RowConverter, SortField};
use datafusion::physical_plan::PhysicalExpr;

use crate::dataflow::checkpoint::{LocalStore, StateReader, StateWriter};
use crate::dataflow::operator::{Barrier, Operator, Output};
use crate::dataflow::{ChangeBatch, FastMap, Watermark};
use crate::error::{Error, Result};
use crate::state::spill::{LocalState, StateFile};

/// Key of the ordered multiset: encoded sort key, then the encoded row.
type Entry = (Box<[u8]>, Box<[u8]>);

/// A row a partition emitted: (encoded row, rank or 0, multiplicity).
type Emitted = (Box<[u8]>, u64, i64);

/// A partition holding at most this many rows keeps them in a sorted vector.
const FEW_ROWS: usize = 32;

/// A partition's rows in order, with their counts. Most partitions of a top-N per group
/// hold a handful of rows (at most `offset + limit` over input that only gains rows), so
/// they are a sorted vector: one allocation, where a B-tree takes a 450-byte node for a
/// single row. A partition that grows past [`FEW_ROWS`] becomes a B-tree for good.
enum Ordered {
    Few(Vec<(Entry, i64)>),
    Many(BTreeMap<Entry, i64>),
}

impl Ordered {
    fn len(&self) -> usize {
        match self {
            Ordered::Few(rows) => rows.len(),
            Ordered::Many(rows) => rows.len(),
        }
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The rows with their counts, first to last.
    fn iter(&self) -> impl Iterator<Item = (&Entry, i64)> {
        let (few, many) = match self {
            Ordered::Few(rows) => (Some(rows.iter().map(|(entry, n)| (entry, *n))), None),
            Ordered::Many(rows) => (None, Some(rows.iter().map(|(entry, n)| (entry, *n)))),
        };
        few.into_iter().flatten().chain(many.into_iter().flatten())
    }

    fn last(&self) -> Option<(&Entry, i64)> {
        match self {
            Ordered::Few(rows) => rows.last().map(|(entry, n)| (entry, *n)),
            Ordered::Many(rows) => rows.last_key_value().map(|(entry, n)| (entry, *n)),
        }
    }

    fn pop_last(&mut self) -> Option<(Entry, i64)> {
        match self {
            Ordered::Few(rows) => rows.pop(),
            Ordered::Many(rows) => rows.pop_last(),
        }
    }

    /// Adds `weight` to the count of (`sort`, `row`), inserting it (if `weight` is
    /// positive) or removing it (at zero). Returns the new count (negative for a
    /// retraction of a row not held, which changes nothing) and the change in rows held.
    fn add(&mut self, sort: &[u8], row: &[u8], weight: i64) -> (i64, isize) {
        let rows = match self {
            Ordered::Few(rows) if rows.len() >= FEW_ROWS && weight > 0 => {
                let many = std::mem::take(rows).into_iter().collect();
                *self = Ordered::Many(many);
                return self.add(sort, row, weight);
            }
            Ordered::Few(rows) => rows,
            Ordered::Many(rows) => {
                return match rows.entry((sort.into(), row.into())) {
                    std::collections::btree_map::Entry::Occupied(mut slot) => {
                        *slot.get_mut() += weight;
                        let count = *slot.get();
                        if count == 0 {
                            slot.remove();
                            return (0, -1);
                        }
                        (count, 0)
                    }
                    std::collections::btree_map::Entry::Vacant(slot) if weight > 0 => {
                        slot.insert(weight);
                        (weight, 1)
                    }
                    std::collections::btree_map::Entry::Vacant(_) => (weight, 0),
                };
            }
        };
        match rows.binary_search_by(|((s, r), _)| (s.as_ref(), r.as_ref()).cmp(&(sort, row))) {
            Ok(at) => {
                rows[at].1 += weight;
                let count = rows[at].1;
                if count == 0 {
                    rows.remove(at);
                    return (0, -1);
                }
                (count, 0)
            }
            Err(at) if weight > 0 => {
                rows.insert(at, ((sort.into(), row.into()), weight));
                (weight, 1)
            }
            Err(_) => (weight, 0),
        }
    }
}

/// The rows of one partition (all rows when there is no PARTITION BY).
struct Group {
    ordered: Ordered,
    /// What was emitted, ordered by (row, rank); ranks are 0 without a row number.
    emitted: Vec<Emitted>,
    /// Estimated bytes it takes in memory, its partition key included.
    bytes: usize,
    /// The barrier count when it last changed, to spill the least recently used first.
    used: u64,
    /// Its spilled copy, if it has one, equals it: spilling it again writes nothing.
    synced: bool,
    /// Changed since the last barrier (its key is in [`TopNOperator::dirty`]).
    dirty: bool,
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
        Group {
            ordered: Ordered::Few(Vec::new()),
            emitted: Vec::new(),
            bytes,
            used: clock,
            synced: false,
            dirty: false,
        }
    }

    /// Drops the rows past position `end`, which rows to come can only push further down
    /// (input that only gains rows); returns the bytes freed.
    fn drop_unreachable(&mut self, end: usize) -> usize {
        // Usually one row is past the ranks: pop from the end, which allocates nothing.
        let mut total: usize = self.ordered.iter().map(|(_, count)| count.max(0) as usize).sum();
        let mut freed = 0;
        while let Some((_, count)) = self.ordered.last() {
            let count = count.max(0) as usize;
            // The last row starts at position `total - count`.
            if total - count < end {
                break;
            }
            total -= count;
            if let Some(((sort, row), _)) = self.ordered.pop_last() {
                freed += entry_bytes(&sort, &row);
            }
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
        for ((sort, row), n) in self.ordered.iter() {
            w.bytes(sort);
            w.bytes(row);
            w.i64(n);
        }
        w.u64(self.emitted.len() as u64);
        for (row, rank, n) in &self.emitted {
            w.bytes(row);
            w.u64(*rank);
            w.i64(*n);
        }
    }

    /// Reads what [`Group::write`] wrote, for partition `key`.
    fn read(r: &mut StateReader, key: &[u8], clock: u64) -> Result<Group> {
        let mut group = Group::new(key, clock);
        for _ in 0..r.len(24)? {
            let (sort, row) = (r.bytes()?, r.bytes()?);
            let count = r.i64()?;
            if count <= 0 {
                return Err(Error::Internal("a top-N partition holds a row with no copies".into()));
            }
            group.bytes += entry_bytes(sort, row);
            group.ordered.add(sort, row, count);
        }
        for _ in 0..r.len(24)? {
            let (row, rank) = (Box::<[u8]>::from(r.bytes()?), r.u64()?);
            group.bytes += entry_bytes(&[], &row);
            group.emitted.push((row, rank, r.i64()?));
        }
        // Checkpoints before this form kept what was emitted in no order.
        group.emitted.sort_unstable_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
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
    /// The partitions changed since the last barrier (each once: see [`Group::dirty`]).
    dirty: Vec<Box<[u8]>>,
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
            dirty: Vec::new(),
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

    /// The rows now in positions `[offset, offset + limit)` of `group`, with their ranks,
    /// ordered by (row, rank) as [`Group::emitted`] is.
    fn current(&self, group: &Group) -> Vec<Emitted> {
        let mut current = Vec::new();
        let (offset, end) = (self.spec.offset, self.spec.offset.saturating_add(self.spec.limit));
        let mut position = 0usize;
        for ((_, row), count) in group.ordered.iter() {
            if position >= end {
                break;
            }
            let first = position.max(offset);
            position = position.saturating_add(count as usize);
            let last = position.min(end);
            if self.spec.numbered {
                current.extend((first..last).map(|p| (row.clone(), p as u64 + 1, 1)));
            } else if last > first {
                // A row is held once, with its count: it appears here once.
                current.push((row.clone(), 0, (last - first) as i64));
            }
        }
        current.sort_unstable_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        current
    }
}

/// The changes from `before` to `after` (both ordered by row, then rank) as (row, rank,
/// weight), appended to `changes`.
fn difference(before: &[Emitted], after: &[Emitted], changes: &mut Vec<Emitted>) {
    let (mut old, mut new) = (before.iter().peekable(), after.iter().peekable());
    loop {
        let order = match (old.peek(), new.peek()) {
            (None, None) => return,
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (Some(a), Some(b)) => (&a.0, a.1).cmp(&(&b.0, b.1)),
        };
        match order {
            std::cmp::Ordering::Less => {
                let Some((row, rank, n)) = old.next() else { return };
                changes.push((row.clone(), *rank, -n));
            }
            std::cmp::Ordering::Greater => {
                let Some((row, rank, n)) = new.next() else { return };
                changes.push((row.clone(), *rank, *n));
            }
            std::cmp::Ordering::Equal => {
                let (Some((_, _, was)), Some((row, rank, is))) = (old.next(), new.next()) else { return };
                if was != is {
                    changes.push((row.clone(), *rank, is - was));
                }
            }
        }
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
            let group_key = groups.as_ref().map_or(&[][..], |g| g.row(i).data());
            self.load_spilled(group_key)?;
            if !self.groups.contains_key(group_key) {
                let group = Group::new(group_key, self.clock);
                self.memory += group.bytes;
                self.groups.insert(group_key.into(), group);
            }
            let group = self.groups.get_mut(group_key).ok_or_else(|| Error::Internal("top-N group vanished".into()))?;
            // Over input that only gains rows, a row that sorts at or after the last of a
            // partition already holding `end` rows lands past position `end`: it can never
            // be among the ranks, so it is not kept at all.
            if self.spec.append_only
                && group.ordered.len() >= end
                && let Some(((sort, row), _)) = group.ordered.last()
                && (keys.row(i).data(), rows.row(i).data()) >= (sort.as_ref(), row.as_ref())
                && input.weights().value(i) >= 0
            {
                continue;
            }
            group.used = self.clock;
            group.synced = false;
            if !group.dirty {
                group.dirty = true;
                self.dirty.push(group_key.into());
            }
            let weight = input.weights().value(i);
            if weight < 0 && self.spec.append_only {
                return Err(Error::Internal("a retraction reached a top-N over input that only gains rows".into()));
            }
            let (sort, row) = (keys.row(i).data(), rows.row(i).data());
            let (count, held) = group.ordered.add(sort, row, weight);
            let size = entry_bytes(sort, row);
            if held > 0 {
                group.bytes += size;
                self.memory += size;
            } else if held < 0 {
                group.bytes -= size;
                self.memory -= size;
            }
            if count < 0 {
                return Err(Error::Internal("top-N saw a retraction of a row it does not hold".into()));
            }
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
            group.dirty = false;
            difference(&group.emitted, &current, &mut changes);
            let emitted_bytes =
                |emitted: &[Emitted]| -> usize { emitted.iter().map(|(row, ..)| entry_bytes(&[], row)).sum() };
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

    /// A partition's rows, as a sorted vector and once past [`FEW_ROWS`] as a B-tree,
    /// hold what an ordered map of counts holds through inserts, repeated rows and
    /// retractions, and say which rows came and went.
    #[test]
    fn a_partition_holds_its_rows_in_order_before_and_after_it_grows_past_few() {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(11);
        let mut ordered = Ordered::Few(Vec::new());
        let mut model: BTreeMap<(Vec<u8>, Vec<u8>), i64> = BTreeMap::new();
        let mut was_few = 0;
        for step in 0..4000 {
            // Grows to about 80 rows over the first half, then shrinks.
            let (sort, row) = (vec![rng.gen_range(0..40u8)], vec![rng.gen_range(0..2u8)]);
            let held = model.get(&(sort.clone(), row.clone())).copied().unwrap_or(0);
            let weight = match (step < 2000, held) {
                (true, _) => rng.gen_range(1..3),
                (false, 0) => 0,
                (false, held) => -rng.gen_range(1..=held),
            };
            let (count, change) = ordered.add(&sort, &row, weight);
            let new = held + weight;
            assert_eq!(count, new, "step {step}: the count after adding {weight}");
            let expected_change = match (held, new) {
                (0, n) if n > 0 => 1,
                (h, 0) if h > 0 => -1,
                _ => 0,
            };
            assert_eq!(change, expected_change, "step {step}: rows held change");
            if new == 0 {
                model.remove(&(sort, row));
            } else {
                model.insert((sort, row), new);
            }
            let got: Vec<_> = ordered.iter().map(|((s, r), n)| ((s.to_vec(), r.to_vec()), n)).collect();
            let want: Vec<_> = model.iter().map(|(k, n)| (k.clone(), *n)).collect();
            assert_eq!(got, want, "step {step}");
            assert_eq!(ordered.last().map(|(_, n)| n), model.values().last().copied(), "step {step}: last row");
            was_few += usize::from(matches!(ordered, Ordered::Few(_)));
        }
        assert!(matches!(ordered, Ordered::Many(_)), "it grew past {FEW_ROWS} rows and became a B-tree");
        assert!(was_few >= FEW_ROWS, "it was a vector until it grew: {was_few} steps");
        assert!(model.len() < FEW_ROWS, "it shrank again: {} rows", model.len());
        while let Some((entry, _)) = ordered.pop_last() {
            let (last, _) = model.pop_last().expect("the model holds as many rows");
            assert_eq!((entry.0.to_vec(), entry.1.to_vec()), last);
        }
        assert!(ordered.is_empty() && model.is_empty());
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
