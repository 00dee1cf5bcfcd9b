//! [`JoinOperator`]: equi-joins of two change streams, both sides arranged by join key.
//!
//! The matched part follows the incremental join rule: a change on one side is joined with
//! the current arrangement of the other side, then added to its own arrangement, so the
//! output over time is ΔA⋈B + A⋈ΔB + ΔA⋈ΔB. The unmatched parts (the NULL-padded rows of
//! outer joins, and the rows semi and anti joins keep) depend only on whether the other
//! side has any row with the key, so they change exactly when a key's total weight on the
//! other side moves between zero and non-zero. Rows with a NULL in their key never match.
//! With a condition beyond key equality, outer, semi and anti joins keep per row the weight
//! of its matches that satisfy the condition instead (see `process_with_condition`).
//!
//! A window join (keys include the same event-time column on both sides, as in
//! `a.window_start = b.window_start`) forwards the lesser of the two sides' watermarks on
//! that column, and forgets every key below both: no change can reach such a key on
//! either side again, so it can never match or be retracted.
//!
//! An interval join (an inner join whose condition bounds one side's event time by the
//! other's, as in `b.ts BETWEEN a.ts AND a.ts + INTERVAL '1 hour'`) forgets a row once no
//! future row of the other side can fall in its interval and its own side's watermark
//! has passed it (so it cannot be retracted either). Its output has no watermark.
//!
//! An inner join with a constant input (a table function or `VALUES`, whose rows all
//! arrive before the first barrier and never change) keeps the other input's rows only
//! until that barrier: after it, a row of the other input looks up its matches and is
//! dropped, as no change will come to match it again.
//!
//! Other joins spill beyond the memory pool's limit: at a barrier, the least recently
//! changed keys of either input go to the operator's local store, and a batch first reads
//! back, on both inputs, the spilled keys it touches. Window and interval joins keep their
//! state in memory; their watermarks bound it.

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::{Array, ArrayRef, BooleanArray, Int64Array, RecordBatchOptions, UInt32Array};
use datafusion::arrow::compute::{cast, take};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::arrow::row::{RowConverter, Rows, SortField};
use datafusion::physical_plan::PhysicalExpr;
use hashbrown::hash_map::EntryRef;

use crate::dataflow::checkpoint::{LocalStore, StateReader, StateWriter};
use crate::dataflow::operator::{Barrier, Operator, Output};
use crate::dataflow::{ChangeBatch, FastMap, FastSet, Watermark};
use crate::error::{Error, Result};
use crate::state::spill::{LocalState, StateFile};

/// Which rows a join produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinKind {
    Inner,
    Left,
    Right,
    Full,
    /// Left rows with at least one match (`IN`, `EXISTS`).
    LeftSemi,
    /// Left rows without a match (`NOT EXISTS`).
    LeftAnti,
}

impl JoinKind {
    fn pads_left(self) -> bool {
        matches!(self, JoinKind::Left | JoinKind::Full)
    }

    fn pads_right(self) -> bool {
        matches!(self, JoinKind::Right | JoinKind::Full)
    }

    fn pairs(self) -> bool {
        matches!(self, JoinKind::Inner | JoinKind::Left | JoinKind::Right | JoinKind::Full)
    }
}

/// Encoded rows with their multiplicities.
type RowCounts = KeyMap<i64>;

/// Encoded join keys (or rows) to what is held under each. Its entry API finds, inserts
/// and removes an entry with one hash of a borrowed key.
type KeyMap<V> = hashbrown::HashMap<Box<[u8]>, V, foldhash::fast::RandomState>;

/// One key's distinct rows with their counts (never zero). Most keys of a join on an
/// identifier hold a single row, which needs no map of its own.
enum KeyRows {
    One(Box<[u8]>, i64),
    Many(RowCounts),
}

impl KeyRows {
    fn one(row: &[u8], count: i64) -> Self {
        KeyRows::One(row.into(), count)
    }

    fn get(&self, row: &[u8]) -> Option<i64> {
        match self {
            KeyRows::One(held, count) => (**held == *row).then_some(*count),
            KeyRows::Many(rows) => rows.get(row).copied(),
        }
    }

    /// Adds `w` (not zero) copies of `row`; returns its count before.
    fn add(&mut self, row: &[u8], w: i64) -> i64 {
        match self {
            KeyRows::One(held, count) if **held == *row => {
                let before = *count;
                *count += w;
                if *count == 0 {
                    *self = KeyRows::Many(RowCounts::default());
                }
                before
            }
            KeyRows::One(held, count) => {
                let mut rows = RowCounts::default();
                rows.insert(std::mem::take(held), *count);
                rows.insert(row.into(), w);
                *self = KeyRows::Many(rows);
                0
            }
            KeyRows::Many(rows) if rows.is_empty() => {
                *self = KeyRows::one(row, w);
                0
            }
            KeyRows::Many(rows) => match rows.entry_ref(row) {
                EntryRef::Occupied(mut entry) => {
                    let before = *entry.get();
                    *entry.get_mut() += w;
                    if before + w == 0 {
                        entry.remove();
                    }
                    before
                }
                EntryRef::Vacant(vacant) => {
                    vacant.insert(w);
                    0
                }
            },
        }
    }

    /// Removes every copy of `row`; returns how many there were.
    fn remove(&mut self, row: &[u8]) -> Option<i64> {
        match self {
            KeyRows::One(held, count) if **held == *row => {
                let count = *count;
                *self = KeyRows::Many(RowCounts::default());
                Some(count)
            }
            KeyRows::One(..) => None,
            KeyRows::Many(rows) => rows.remove(row),
        }
    }

    fn len(&self) -> usize {
        match self {
            KeyRows::One(..) => 1,
            KeyRows::Many(rows) => rows.len(),
        }
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn iter(&self) -> impl Iterator<Item = (&[u8], i64)> {
        let (one, many) = match self {
            KeyRows::One(row, count) => (Some((&row[..], *count)), None),
            KeyRows::Many(rows) => (None, Some(rows.iter().map(|(row, count)| (&row[..], *count)))),
        };
        one.into_iter().chain(many.into_iter().flatten())
    }
}

impl FromIterator<(Box<[u8]>, i64)> for KeyRows {
    fn from_iter<I: IntoIterator<Item = (Box<[u8]>, i64)>>(rows: I) -> Self {
        let mut held = KeyRows::Many(RowCounts::default());
        for (row, count) in rows {
            if count != 0 {
                held.add(&row, count);
            }
        }
        held
    }
}

/// A batch's join keys, encoded, read in place (no allocation per row).
struct EncodedKeys {
    encoded: Rows,
    /// Whether each row's key has no NULL (a NULL key matches nothing).
    valid: Vec<bool>,
}

impl EncodedKeys {
    /// Row `i`'s key; `None` where a key column is NULL.
    fn get(&self, i: usize) -> Option<&[u8]> {
        self.valid[i].then(|| self.encoded.row(i).data())
    }

    fn iter(&self) -> impl Iterator<Item = Option<&[u8]>> {
        (0..self.valid.len()).map(|i| self.get(i))
    }
}

/// One key's rows on one side.
struct Arranged {
    rows: KeyRows,
    /// The sum of the rows' counts.
    weight: i64,
    /// Estimated bytes it takes in memory, its key included.
    bytes: usize,
    /// The barrier count when it last changed (or, once keys have spilled, was matched),
    /// to spill the least recently used first.
    used: u64,
    /// Its spilled copy, if it has one, equals it: spilling it again writes nothing.
    synced: bool,
}

impl Arranged {
    /// Its rows with their counts, in a checkpoint or a spilled value.
    fn write_rows(&self, w: &mut StateWriter) {
        w.counts(self.rows.len(), self.rows.iter());
    }

    /// What a key's rows are spilled as.
    fn spilled_value(&self) -> Vec<u8> {
        let mut w = StateWriter::with_capacity(self.bytes);
        self.write_rows(&mut w);
        w.finish()
    }
}

/// Estimated bytes of a key's entry apart from its rows: the index entry, the key and
/// the row map.
fn key_bytes(key: &[u8]) -> usize {
    120 + key.len()
}

/// Estimated bytes of one row in a key's map.
fn row_bytes(row: &[u8]) -> usize {
    40 + row.len()
}

/// One input's arrangement: rows (encoded) by key, with multiplicities.
struct Side {
    keys: Vec<Arc<dyn PhysicalExpr>>,
    rows: RowConverter,
    /// The keys in memory (all of them until some spill).
    by_key: KeyMap<Arranged>,
    /// With a non-equality condition on an outer, semi or anti join: per distinct row, the
    /// weight of the other side's rows it matches (same key and condition true). An inner
    /// join filters its pairs instead (see `build`) and keeps none.
    matched: FastMap<Box<[u8]>, i64>,
    /// Estimated bytes of `by_key`.
    memory: usize,
    /// Barriers seen.
    clock: u64,
    /// Once keys may have copies in the spill store: the keys that emptied since the
    /// store was last written, whose copies are to be deleted. Until then those copies
    /// are stale, and a key among these is never read back.
    emptied: Option<FastSet<Box<[u8]>>>,
}

impl Side {
    fn weight_of(&self, key: &[u8]) -> i64 {
        self.by_key.get(key).map_or(0, |arranged| arranged.weight)
    }

    fn count_of(&self, key: &[u8], row: &[u8]) -> i64 {
        self.by_key.get(key).and_then(|arranged| arranged.rows.get(row)).unwrap_or(0)
    }

    /// Adds `w` copies of `row` under `key`, and returns how many it held before. Keys and
    /// rows are copied only when new: this runs for every row a join sees.
    fn add(&mut self, key: &[u8], row: &[u8], w: i64) -> i64 {
        if w == 0 {
            return self.count_of(key, row);
        }
        let mut entry = match self.by_key.entry_ref(key) {
            EntryRef::Occupied(entry) => entry,
            EntryRef::Vacant(vacant) => {
                let bytes = key_bytes(key) + row_bytes(row);
                self.memory += bytes;
                vacant.insert(Arranged {
                    rows: KeyRows::one(row, w),
                    weight: w,
                    bytes,
                    used: self.clock,
                    synced: false,
                });
                return 0;
            }
        };
        let arranged = entry.get_mut();
        arranged.weight += w;
        arranged.used = self.clock;
        arranged.synced = false;
        let before = arranged.rows.add(row, w);
        if before == 0 {
            arranged.bytes += row_bytes(row);
            self.memory += row_bytes(row);
        } else if before + w == 0 {
            arranged.bytes -= row_bytes(row);
            self.memory -= row_bytes(row);
        }
        if arranged.rows.is_empty() {
            let arranged = entry.remove();
            self.emptied_key(key, &arranged);
        }
        before
    }

    /// Removes every copy of `row` under `key`.
    fn forget(&mut self, key: &[u8], row: &[u8]) {
        let EntryRef::Occupied(mut entry) = self.by_key.entry_ref(key) else { return };
        let arranged = entry.get_mut();
        let Some(count) = arranged.rows.remove(row) else { return };
        arranged.weight -= count;
        arranged.bytes -= row_bytes(row);
        arranged.synced = false;
        self.memory -= row_bytes(row);
        if arranged.rows.is_empty() {
            let arranged = entry.remove();
            self.emptied_key(key, &arranged);
        }
    }

    /// Removes `key` and its rows (and, at the next write, its spilled copy).
    fn remove(&mut self, key: &[u8]) -> Option<Arranged> {
        let arranged = self.by_key.remove(key)?;
        self.emptied_key(key, &arranged);
        Some(arranged)
    }

    /// Accounts for `key`, holding `arranged`, having left memory because it emptied.
    fn emptied_key(&mut self, key: &[u8], arranged: &Arranged) {
        self.memory -= arranged.bytes;
        if let Some(emptied) = &mut self.emptied {
            emptied.insert(key.into());
        }
    }

    /// Puts `key` back in memory from its spilled `value` (as [`Arranged::spilled_value`]
    /// wrote it).
    fn load(&mut self, key: &[u8], value: &[u8]) -> Result<()> {
        let mut r = StateReader::new(value, "a spilled join key");
        let rows: KeyRows = r.counts()?.into_iter().collect();
        r.finish()?;
        let weight = rows.iter().map(|(_, count)| count).sum();
        let bytes = key_bytes(key) + rows.iter().map(|(row, _)| row_bytes(row)).sum::<usize>();
        self.memory += bytes;
        self.by_key.insert(key.into(), Arranged { rows, weight, bytes, used: self.clock, synced: true });
        Ok(())
    }
}

/// A join key and a weight.
type KeyedWeight = (Box<[u8]>, i64);

/// One output row before it is decoded: the two sides' encoded rows (None = NULL padding),
/// owned or borrowed from the input and the other side's arrangement.
type Piece<R> = (Option<R>, Option<R>, i64);

/// `left JOIN right ON left.keys = right.keys [AND filter]`.
pub struct JoinOperator {
    kind: JoinKind,
    left: Side,
    right: Side,
    key_converter: RowConverter,
    key_types: Vec<DataType>,
    /// The condition beyond key equality, over a left row followed by a right row.
    filter: Option<Arc<dyn PhysicalExpr>>,
    /// Left then right columns: what `filter` is evaluated over.
    pair_schema: SchemaRef,
    schema: SchemaRef,
    left_width: usize,
    event_time: Option<JoinEventTime>,
    interval: Option<IntervalJoin>,
    /// An inner join with an input that never changes once its rows are in (a constant
    /// relation): that input, and whether its rows are all in (a barrier has passed).
    /// From then on the other input's rows only look up matches and are not kept, as no
    /// change will come to match them again.
    fixed: Option<Fixed>,
    /// Where keys spill beyond memory (set by the runtime; unset in unit tests). Its store
    /// opens when keys first spill, or when a checkpoint first goes through it.
    spill: Option<LocalStore>,
    /// Said once that the state is over the memory limit but cannot spill.
    warned: bool,
}

/// Arrangements at least this large are checkpointed into the spill store (so later
/// checkpoints upload only what changed) rather than written whole each time.
const INCREMENTAL_FROM: usize = 4 << 20;

/// Which keys in memory [`JoinOperator::sync`] writes to the spill store.
enum SyncKeys<'a> {
    /// Only the deletes of keys that emptied.
    None,
    /// Every key whose spilled copy is stale.
    All,
    /// These keys, by side.
    These(&'a [(usize, Box<[u8]>)]),
}

/// A key's name in the spill store: its side, then the key.
fn spilled_key(port: usize, key: &[u8]) -> Vec<u8> {
    let mut spilled = Vec::with_capacity(key.len() + 1);
    spilled.push(port as u8);
    spilled.extend_from_slice(key);
    spilled
}

/// How far apart in event time an interval join's matches can be, and its rows by time.
struct IntervalJoin {
    /// The event-time column of each input (left, right).
    columns: [usize; 2],
    /// Most a match's right time exceeds its left time, and the reverse (`None`: unbounded).
    right_after_left: Option<i64>,
    left_after_right: Option<i64>,
    watermarks: [Option<i64>; 2],
    /// Per side, (key, row) by event time.
    by_time: [RowsByTime; 2],
}

/// Encoded (key, row) pairs by event time.
type RowsByTime = std::collections::BTreeMap<i64, KeyedRows>;

/// Encoded (key, row) pairs back to back in one buffer: the pairs of one event time.
#[derive(Default)]
struct KeyedRows {
    bytes: Vec<u8>,
    /// Per pair, where its key ends and where its row ends in `bytes`.
    ends: Vec<(usize, usize)>,
}

impl KeyedRows {
    fn push(&mut self, key: &[u8], row: &[u8]) {
        self.bytes.extend_from_slice(key);
        let key_end = self.bytes.len();
        self.bytes.extend_from_slice(row);
        self.ends.push((key_end, self.bytes.len()));
    }

    fn len(&self) -> usize {
        self.ends.len()
    }

    fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        let starts = std::iter::once(0).chain(self.ends.iter().map(|&(_, row_end)| row_end));
        starts
            .zip(&self.ends)
            .map(|(start, &(key_end, row_end))| (&self.bytes[start..key_end], &self.bytes[key_end..row_end]))
    }
}

/// The input of an inner join that never changes once its rows are in.
struct Fixed {
    port: usize,
    /// Its rows are all in: the first barrier has passed (or state was restored).
    complete: bool,
}

/// The event-time column in a window join's keys, and the keys held by its time.
struct JoinEventTime {
    /// The column in each input (left, right).
    columns: [usize; 2],
    /// The output columns that carry it (the left one, and the right one if output).
    outputs: Vec<usize>,
    /// Each input's latest watermark on its column.
    watermarks: [Option<i64>; 2],
    forwarded: Option<i64>,
    /// Per side, the keys held, by event time, and each key's time.
    by_time: [std::collections::BTreeMap<i64, Vec<Box<[u8]>>>; 2],
    known: [FastMap<Box<[u8]>, i64>; 2],
}

impl JoinOperator {
    /// `left_types`/`right_types` are the input column types; `key_types` the (common) key
    /// types; `filter` is evaluated over the left columns followed by the right columns;
    /// `schema` is the output.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        kind: JoinKind,
        left_keys: Vec<Arc<dyn PhysicalExpr>>,
        right_keys: Vec<Arc<dyn PhysicalExpr>>,
        key_types: Vec<DataType>,
        left_types: Vec<DataType>,
        right_types: Vec<DataType>,
        filter: Option<Arc<dyn PhysicalExpr>>,
        schema: SchemaRef,
    ) -> Result<Self> {
        let side = |keys, types: Vec<DataType>| -> Result<Side> {
            Ok(Side {
                keys,
                rows: RowConverter::new(types.into_iter().map(SortField::new).collect())?,
                by_key: KeyMap::default(),
                matched: FastMap::default(),
                memory: 0,
                clock: 0,
                emptied: None,
            })
        };
        let left_types_len = left_types.len();
        let pair_schema = Arc::new(Schema::new(
            left_types
                .iter()
                .chain(&right_types)
                .enumerate()
                .map(|(i, t)| Field::new(format!("c{i}"), t.clone(), true))
                .collect::<Vec<_>>(),
        ));
        Ok(JoinOperator {
            kind,
            left: side(left_keys, left_types)?,
            right: side(right_keys, right_types)?,
            key_converter: RowConverter::new(key_types.iter().cloned().map(SortField::new).collect())?,
            key_types,
            filter,
            pair_schema,
            schema,
            left_width: left_types_len,
            event_time: None,
            interval: None,
            fixed: None,
            spill: None,
            warned: false,
        })
    }

    /// Whether keys can spill: not for window and interval joins, whose bookkeeping by
    /// time stays in memory and whose state their watermarks bound.
    fn spillable(&self) -> bool {
        self.event_time.is_none() && self.interval.is_none()
    }

    /// Opens the spill store if need be; from then on, emptied keys are deleted from it.
    fn open_store(&mut self) -> Result<()> {
        let Some(spill) = &mut self.spill else {
            return Err(Error::Internal("a join spills without a local directory".into()));
        };
        spill.open("join state")?;
        for side in [&mut self.left, &mut self.right] {
            side.emptied.get_or_insert_default();
        }
        Ok(())
    }

    /// Brings the spilled keys among `keys` back into memory, on both sides, and marks
    /// every key among them used.
    fn load_spilled(&mut self, keys: &EncodedKeys) -> Result<()> {
        let unkept = self.unkept_input();
        let Some(store) = self.spill.as_ref().and_then(|s| s.store.as_ref()) else { return Ok(()) };
        for key in keys.iter().flatten() {
            for (port, side) in [&mut self.left, &mut self.right].into_iter().enumerate() {
                if unkept == Some(port) {
                    // A lookup join's other input holds nothing, in memory or spilled.
                } else if let Some(arranged) = side.by_key.get_mut(key) {
                    arranged.used = side.clock;
                } else if side.emptied.as_ref().is_some_and(|emptied| emptied.contains(key)) {
                    // Emptied earlier in this epoch: its spilled copy is about to go.
                } else if let Some(value) = store.get(&spilled_key(port, key))? {
                    side.load(key, &value)?;
                }
            }
        }
        Ok(())
    }

    /// Writes to the spill store (which must be open): deletes of the keys that emptied,
    /// then `keys` whose spilled copies are stale.
    fn sync(&mut self, keys: SyncKeys) -> Result<()> {
        let mut entries: Vec<(Vec<u8>, Option<Vec<u8>>)> = Vec::new();
        for (port, side) in [&mut self.left, &mut self.right].into_iter().enumerate() {
            let emptied = side.emptied.as_mut().map(std::mem::take).unwrap_or_default();
            entries.extend(emptied.iter().map(|key| (spilled_key(port, key), None)));
        }
        let mut write = |port: usize, key: &[u8], arranged: &mut Arranged| {
            if !arranged.synced {
                arranged.synced = true;
                entries.push((spilled_key(port, key), Some(arranged.spilled_value())));
            }
        };
        match keys {
            SyncKeys::None => {}
            SyncKeys::All => {
                for (port, side) in [&mut self.left, &mut self.right].into_iter().enumerate() {
                    side.by_key.iter_mut().for_each(|(key, arranged)| write(port, key, arranged));
                }
            }
            SyncKeys::These(keys) => {
                for (port, key) in keys {
                    let side = if *port == 0 { &mut self.left } else { &mut self.right };
                    if let Some(arranged) = side.by_key.get_mut(key) {
                        write(*port, key, arranged);
                    }
                }
            }
        }
        let store = self.spill.as_ref().and_then(|s| s.store.as_ref());
        let store = store.ok_or_else(|| Error::Internal("writing join keys without a spill store".into()))?;
        store.write(entries.iter().map(|(key, value)| (key.as_slice(), value.as_deref())))
    }

    /// Moves the least recently used keys, of both sides, to the spill store until memory
    /// is at most `target` bytes.
    fn evict(&mut self, target: usize) -> Result<()> {
        if !self.spillable() {
            if !self.warned {
                self.warned = true;
                tracing::warn!(
                    "over the memory limit, but a window or interval join's state cannot spill (its watermarks free it)"
                );
            }
            return Ok(());
        }
        self.open_store()?;
        let over = (self.left.memory + self.right.memory).saturating_sub(target);
        let mut by_use: Vec<(u64, usize, &Box<[u8]>, usize)> = Vec::new();
        for (port, side) in [&self.left, &self.right].into_iter().enumerate() {
            by_use.extend(side.by_key.iter().map(|(key, a)| (a.used, port, key, a.bytes)));
        }
        by_use.sort_unstable_by_key(|(used, ..)| *used);
        let mut freed = 0;
        let victims: Vec<(usize, Box<[u8]>)> = by_use
            .into_iter()
            .take_while(|(.., bytes)| {
                let more = freed < over;
                freed += bytes;
                more
            })
            .map(|(_, port, key, _)| (port, key.clone()))
            .collect();
        self.sync(SyncKeys::These(&victims))?;
        for (port, key) in victims {
            let side = if port == 0 { &mut self.left } else { &mut self.right };
            if let Some(arranged) = side.by_key.remove(&key) {
                side.memory -= arranged.bytes;
            }
        }
        Ok(())
    }

    /// Makes this an interval join on event-time columns `left` and `right` (input column
    /// indices, same unit): a match's right time is at most `right_after_left` after its left
    /// time, and its left time at most `left_after_right` after its right time.
    pub fn with_interval(
        mut self,
        left: usize,
        right: usize,
        right_after_left: Option<i64>,
        left_after_right: Option<i64>,
    ) -> Self {
        if self.kind == JoinKind::Inner {
            self.interval = Some(IntervalJoin {
                columns: [left, right],
                right_after_left,
                left_after_right,
                watermarks: [None, None],
                by_time: Default::default(),
            });
        }
        self
    }

    /// Makes input `port` of an inner join one that never changes after its first rows (a
    /// constant relation, sent whole before the first barrier): the other input's rows are
    /// then kept only until that barrier.
    pub fn with_fixed_input(mut self, port: usize) -> Self {
        if self.kind == JoinKind::Inner && port < 2 {
            self.fixed = Some(Fixed { port, complete: false });
        }
        self
    }

    /// The input whose rows are no longer kept: the other one of a join whose fixed input's
    /// rows are all in.
    fn unkept_input(&self) -> Option<usize> {
        self.fixed.as_ref().filter(|fixed| fixed.complete).map(|fixed| 1 - fixed.port)
    }

    /// Once the fixed input's rows are all in, the other input's rows are no longer needed.
    fn forget_unfixed(&mut self) {
        let Some(fixed) = &mut self.fixed else { return };
        fixed.complete = true;
        let side = if fixed.port == 0 { &mut self.right } else { &mut self.left };
        if !side.by_key.is_empty() {
            side.by_key = KeyMap::default();
            side.memory = 0;
        }
        if let Some(interval) = &mut self.interval {
            interval.by_time[1 - fixed.port].clear();
        }
    }

    /// Forgets the rows of an interval join no future change can match or retract.
    fn forget_unreachable(&mut self) {
        let Some(interval) = &mut self.interval else { return };
        let [Some(left_wm), Some(right_wm)] = interval.watermarks else { return };
        // A left row at t matches right rows up to t + right_after_left; right rows to come
        // are at right_wm or later.
        let bounds = [
            interval.right_after_left.map(|d| left_wm.min(right_wm.saturating_sub(d))),
            interval.left_after_right.map(|d| right_wm.min(left_wm.saturating_sub(d))),
        ];
        for (port, side) in [&mut self.left, &mut self.right].into_iter().enumerate() {
            let Some(bound) = bounds[port] else { continue };
            let open = interval.by_time[port].split_off(&bound);
            let closed = std::mem::replace(&mut interval.by_time[port], open);
            for (key, row) in closed.values().flat_map(KeyedRows::iter) {
                side.forget(key, row);
            }
        }
    }

    /// Makes this a window join on event-time columns `left` and `right` (input column
    /// indices), which are equal in every match.
    pub fn with_event_time(mut self, left: usize, right: usize) -> Self {
        let mut outputs = vec![left];
        if self.kind.pairs() {
            outputs.push(self.left_width + right);
        }
        self.event_time = Some(JoinEventTime {
            columns: [left, right],
            outputs,
            watermarks: [None, None],
            forwarded: None,
            by_time: Default::default(),
            known: Default::default(),
        });
        self
    }

    /// Notes the event time of keys first seen on side `port`.
    fn remember_times(&mut self, port: usize, batch: &RecordBatch, keys: &EncodedKeys) -> Result<()> {
        let Some(event_time) = &mut self.event_time else { return Ok(()) };
        let column = batch
            .columns()
            .get(event_time.columns[port])
            .ok_or_else(|| Error::Internal("a window join's time column is missing".into()))?;
        let times = cast(column, &DataType::Int64)?;
        let times = times
            .as_any()
            .downcast_ref::<Int64Array>()
            .ok_or_else(|| Error::Internal("event times did not cast to integers".into()))?;
        for (i, key) in keys.iter().enumerate() {
            if let Some(key) = key
                && times.is_valid(i)
                && !event_time.known[port].contains_key(key)
            {
                event_time.known[port].insert(key.into(), times.value(i));
                event_time.by_time[port].entry(times.value(i)).or_default().push(key.into());
            }
        }
        Ok(())
    }

    /// Forgets, on both sides, every key whose event time is below `watermark`.
    fn forget_before(&mut self, watermark: i64) {
        let Some(event_time) = &mut self.event_time else { return };
        for (port, side) in [&mut self.left, &mut self.right].into_iter().enumerate() {
            let open = event_time.by_time[port].split_off(&watermark);
            let closed = std::mem::replace(&mut event_time.by_time[port], open);
            for key in closed.into_values().flatten() {
                event_time.known[port].remove(&key);
                if let Some(arranged) = side.remove(&key) {
                    for (row, _) in arranged.rows.iter() {
                        side.matched.remove(row);
                    }
                }
            }
        }
    }

    /// Encoded keys of a batch (None where a key column is NULL) and encoded rows.
    fn encode(&self, port: usize, batch: &RecordBatch) -> Result<(EncodedKeys, Rows)> {
        let side = if port == 0 { &self.left } else { &self.right };
        let mut keys = Vec::with_capacity(side.keys.len());
        for (expr, key_type) in side.keys.iter().zip(&self.key_types) {
            let values = expr.evaluate(batch)?.into_array(batch.num_rows())?;
            keys.push(if values.data_type() == key_type { values } else { cast(&values, key_type)? });
        }
        let encoded = self.key_converter.convert_columns(&keys)?;
        let valid = (0..batch.num_rows()).map(|i| keys.iter().all(|k| k.is_valid(i))).collect();
        Ok((EncodedKeys { encoded, valid }, side.rows.convert_columns(batch.columns())?))
    }

    /// Decodes pieces into an output batch.
    fn build<R: AsRef<[u8]>>(&self, pieces: Vec<Piece<R>>) -> Result<Option<ChangeBatch>> {
        if pieces.is_empty() {
            return Ok(None);
        }
        let n = pieces.len();
        let mut columns = Vec::new();
        let (lefts, rest): (Vec<_>, Vec<_>) = pieces.into_iter().map(|(l, r, w)| (l, (r, w))).unzip();
        let (rights, weights): (Vec<_>, Vec<_>) = rest.into_iter().unzip();
        match self.kind {
            JoinKind::LeftSemi | JoinKind::LeftAnti => columns.extend(decode_side(&self.left.rows, &lefts)?),
            _ => {
                columns.extend(decode_side(&self.left.rows, &lefts)?);
                columns.extend(decode_side(&self.right.rows, &rights)?);
            }
        }
        let columns = columns
            .into_iter()
            .zip(self.schema.fields())
            .map(|(c, f)| if c.data_type() == f.data_type() { Ok(c) } else { cast(&c, f.data_type()) })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let batch = RecordBatch::try_new_with_options(
            self.schema.clone(),
            columns,
            &RecordBatchOptions::new().with_row_count(Some(n)),
        )?;
        let mut change = ChangeBatch::try_new(batch, Int64Array::from(weights))?;
        // Inner joins filter their pairs here; the other kinds decided per pair already.
        if let Some(filter) = self.filter.as_ref().filter(|_| self.kind == JoinKind::Inner) {
            let mask = filter.evaluate(change.batch())?.into_array(n)?;
            let mask = mask
                .as_any()
                .downcast_ref::<BooleanArray>()
                .ok_or_else(|| Error::Internal("join filter is not boolean".into()))?;
            change = change.filter(mask)?;
        }
        Ok(Some(change))
    }
}

impl JoinOperator {
    /// Outer, semi and anti joins with a condition beyond key equality. Whether a row has
    /// a match depends on the row itself, so each side keeps, per distinct row, the weight
    /// of the other side's rows it matches; a row's padding (or its place in a semi or
    /// anti join) changes exactly when that weight moves between zero and non-zero.
    fn process_with_condition(&mut self, port: usize, input: ChangeBatch, out: &mut Output) -> Result<()> {
        let (keys, rows) = self.encode(port, input.batch())?;
        self.remember_times(port, input.batch(), &keys)?;
        self.load_spilled(&keys)?;
        let kind = self.kind;
        let weights = input.weights();
        let row = |i: usize| rows.row(i).data();
        // Candidate pairs: each input row with every other-side row of its key. Only the
        // pairs the condition holds for are copied out of the arrangement.
        let matching: Vec<(usize, Box<[u8]>, i64)> = {
            let other = if port == 0 { &self.right } else { &self.left };
            let mut candidates: Vec<(usize, &[u8], i64)> = Vec::new();
            for (i, key) in keys.iter().enumerate() {
                if let Some(matches) = key.and_then(|k| other.by_key.get(k)) {
                    candidates.extend(matches.rows.iter().map(|(row, count)| (i, row, count)));
                }
            }
            let passing = self.condition_holds(port, &rows, &candidates)?;
            candidates
                .into_iter()
                .zip(passing)
                .filter(|(_, holds)| *holds)
                .map(|((i, row, count), _)| (i, Box::from(row), count))
                .collect()
        };
        let mut pieces: Vec<Piece<Box<[u8]>>> = Vec::new();
        // Per input row, the weight of its matches; per other-side row, the change in its.
        let mut matched = vec![0i64; input.num_rows()];
        let mut other_delta: FastMap<Box<[u8]>, KeyedWeight> = FastMap::default();
        for (i, other_row, count) in matching {
            let w = weights.value(i);
            matched[i] += count;
            let key: Box<[u8]> = keys.get(i).ok_or_else(|| Error::Internal("a NULL key matched".into()))?.into();
            other_delta.entry(other_row.clone()).or_insert((key, 0)).1 += w;
            if kind.pairs() {
                let (l, r) = if port == 0 { (Box::from(row(i)), other_row) } else { (other_row, Box::from(row(i))) };
                pieces.push((Some(l), Some(r), w * count));
            }
        }
        let pads_this = if port == 0 { kind.pads_left() } else { kind.pads_right() };
        let (this, other) =
            if port == 0 { (&mut self.left, &mut self.right) } else { (&mut self.right, &mut self.left) };
        for (i, &matches) in matched.iter().enumerate() {
            let (w, row) = (weights.value(i), row(i));
            let unmatched = matches == 0;
            match (port, kind) {
                (0, JoinKind::LeftSemi) if !unmatched => pieces.push((Some(row.into()), None, w)),
                (0, JoinKind::LeftAnti) if unmatched => pieces.push((Some(row.into()), None, w)),
                _ if pads_this && unmatched => {
                    pieces.push(if port == 0 { (Some(row.into()), None, w) } else { (None, Some(row.into()), w) })
                }
                _ => {}
            }
            let Some(key) = keys.get(i) else { continue };
            let before = this.add(key, row, w);
            // A row held for the first time starts with its matches; one no longer held
            // forgets them.
            if before + w == 0 {
                this.matched.remove(row);
            } else if before == 0 {
                this.matched.insert(row.into(), matches);
            }
        }
        // Other-side rows whose matches went between none and some.
        let other_pads = if port == 0 { kind.pads_right() } else { kind.pads_left() };
        let other_is_semi_or_anti = port == 1 && matches!(kind, JoinKind::LeftSemi | JoinKind::LeftAnti);
        for (other_row, (key, delta)) in other_delta {
            let old = other.matched.get(&other_row).copied().unwrap_or(0);
            let new = old + delta;
            other.matched.insert(other_row.clone(), new);
            if (old == 0) == (new == 0) || !(other_pads || other_is_semi_or_anti) {
                continue;
            }
            let count = other.count_of(&key, &other_row);
            // + when the row just lost its last match.
            let unmatched_sign = if new == 0 { 1 } else { -1 };
            pieces.push(match kind {
                JoinKind::LeftSemi => (Some(other_row), None, -unmatched_sign * count),
                JoinKind::LeftAnti => (Some(other_row), None, unmatched_sign * count),
                _ if port == 0 => (None, Some(other_row), unmatched_sign * count),
                _ => (Some(other_row), None, unmatched_sign * count),
            });
        }
        if let Some(change) = self.build(pieces)? {
            out.push(change);
        }
        Ok(())
    }

    /// Evaluates the condition over each candidate pair (NULL counts as false).
    fn condition_holds(&self, port: usize, rows: &Rows, candidates: &[(usize, &[u8], i64)]) -> Result<Vec<bool>> {
        let Some(filter) = &self.filter else { return Ok(vec![true; candidates.len()]) };
        if candidates.is_empty() {
            return Ok(Vec::new());
        }
        let (this_rows, other_rows) =
            if port == 0 { (&self.left.rows, &self.right.rows) } else { (&self.right.rows, &self.left.rows) };
        let this: Vec<Option<&[u8]>> = candidates.iter().map(|(i, _, _)| Some(rows.row(*i).data())).collect();
        let other: Vec<Option<&[u8]>> = candidates.iter().map(|(_, row, _)| Some(*row)).collect();
        let (this, other) = (decode_side(this_rows, &this)?, decode_side(other_rows, &other)?);
        let columns = if port == 0 { [this, other].concat() } else { [other, this].concat() };
        let batch = RecordBatch::try_new_with_options(
            self.pair_schema.clone(),
            columns,
            &RecordBatchOptions::new().with_row_count(Some(candidates.len())),
        )?;
        let mask = filter.evaluate(&batch)?.into_array(candidates.len())?;
        let mask = mask
            .as_any()
            .downcast_ref::<BooleanArray>()
            .ok_or_else(|| Error::Internal("join condition is not boolean".into()))?;
        Ok((0..candidates.len()).map(|i| mask.is_valid(i) && mask.value(i)).collect())
    }
}

/// Decodes one side's rows, with NULLs where a piece has no row for that side.
fn decode_side<R: AsRef<[u8]>>(converter: &RowConverter, rows: &[Option<R>]) -> Result<Vec<ArrayRef>> {
    let parser = converter.parser();
    let present: Vec<_> = rows.iter().flatten().map(|r| parser.parse(r.as_ref())).collect();
    let decoded = if present.is_empty() {
        converter.convert_rows(converter.empty_rows(0, 0).iter())?
    } else {
        converter.convert_rows(present)?
    };
    if rows.iter().all(|r| r.is_some()) {
        return Ok(decoded);
    }
    let mut next = 0u32;
    let indices: UInt32Array = rows
        .iter()
        .map(|r| {
            r.as_ref().map(|_| {
                next += 1;
                next - 1
            })
        })
        .collect();
    Ok(decoded
        .iter()
        .map(|column| take(column.as_ref(), &indices, None))
        .collect::<std::result::Result<Vec<_>, _>>()?)
}

#[async_trait]
impl Operator for JoinOperator {
    fn name(&self) -> &str {
        if self.interval.is_some() {
            return "interval_join (forgets rows out of reach)";
        }
        if self.event_time.is_some() {
            return match self.kind {
                JoinKind::Inner => "window_join",
                _ => "window_join (outer, semi or anti)",
            };
        }
        if self.fixed.is_some() {
            return "lookup_join (into a constant input; the other input's rows are not kept)";
        }
        match self.kind {
            JoinKind::Inner => "join",
            JoinKind::Left => "left_join",
            JoinKind::Right => "right_join",
            JoinKind::Full => "full_join",
            JoinKind::LeftSemi => "semi_join",
            JoinKind::LeftAnti => "anti_join",
        }
    }

    /// Both arrangements; a window join's keys by time and an interval join's rows by time,
    /// with the watermarks they have seen.
    ///
    /// Once keys have spilled, or the arrangements are large, they go into the spill
    /// store instead and the state lists its files: a checkpoint then uploads only files
    /// no earlier one did, so its bytes follow what changed.
    fn checkpoint(&mut self) -> Result<Option<Vec<u8>>> {
        let memory = self.left.memory + self.right.memory;
        let spilled = self.spill.as_ref().is_some_and(|s| s.store.is_some());
        let through_store = self.spill.is_some() && self.spillable() && (spilled || memory >= INCREMENTAL_FROM);
        let mut w = StateWriter::with_capacity(if through_store { 4096 } else { memory });
        w.u64(through_store as u64);
        for side in [&self.left, &self.right] {
            if !through_store {
                w.u64(side.by_key.len() as u64);
                for (key, arranged) in &side.by_key {
                    w.bytes(key);
                    arranged.write_rows(&mut w);
                }
            }
            w.counts(side.matched.len(), side.matched.iter().map(|(row, n)| (row.as_ref(), *n)));
        }
        if let Some(event_time) = &self.event_time {
            event_time.watermarks.iter().chain([&event_time.forwarded]).for_each(|v| w.opt_i64(*v));
            for side in &event_time.by_time {
                w.u64(side.len() as u64);
                for (time, keys) in side {
                    w.i64(*time);
                    w.u64(keys.len() as u64);
                    keys.iter().for_each(|k| w.bytes(k));
                }
            }
        }
        if let Some(interval) = &self.interval {
            interval.watermarks.iter().for_each(|v| w.opt_i64(*v));
            for side in &interval.by_time {
                w.u64(side.len() as u64);
                for (time, pairs) in side {
                    w.i64(*time);
                    w.u64(pairs.len() as u64);
                    for (key, row) in pairs.iter() {
                        w.bytes(key);
                        w.bytes(row);
                    }
                }
            }
        }
        if through_store {
            self.open_store()?;
            self.sync(SyncKeys::All)?;
            let spill = self.spill.as_mut().ok_or_else(|| Error::Internal("spill store vanished".into()))?;
            spill.checkpoint_into(&mut w)?;
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
        let mut r = StateReader::new(state, "a join");
        let through_store = r.u64()? != 0;
        for side in [&mut self.left, &mut self.right] {
            side.by_key.clear();
            side.memory = 0;
            if !through_store {
                for _ in 0..r.len(16)? {
                    let key = r.bytes()?;
                    for (row, n) in r.counts()? {
                        side.add(key, &row, n);
                    }
                }
            }
            side.matched = r.counts()?.into_iter().collect();
        }
        if let Some(event_time) = &mut self.event_time {
            event_time.watermarks = [r.opt_i64()?, r.opt_i64()?];
            event_time.forwarded = r.opt_i64()?;
            for (by_time, known) in event_time.by_time.iter_mut().zip(event_time.known.iter_mut()) {
                by_time.clear();
                known.clear();
                for _ in 0..r.len(16)? {
                    let time = r.i64()?;
                    let keys = (0..r.len(8)?).map(|_| Ok(Box::from(r.bytes()?))).collect::<Result<Vec<Box<[u8]>>>>()?;
                    known.extend(keys.iter().map(|k| (k.clone(), time)));
                    by_time.insert(time, keys);
                }
            }
        }
        if let Some(interval) = &mut self.interval {
            interval.watermarks = [r.opt_i64()?, r.opt_i64()?];
            for side in &mut interval.by_time {
                side.clear();
                for _ in 0..r.len(16)? {
                    let time = r.i64()?;
                    let mut pairs = KeyedRows::default();
                    for _ in 0..r.len(16)? {
                        pairs.push(r.bytes()?, r.bytes()?);
                    }
                    side.insert(time, pairs);
                }
            }
        }
        if through_store {
            let spill = self
                .spill
                .as_mut()
                .ok_or_else(|| Error::Internal("restoring spilled state without a local directory".into()))?;
            spill.restore_from(&mut r)?;
            for side in [&mut self.left, &mut self.right] {
                side.emptied = Some(FastSet::default());
            }
        }
        // Checkpoints follow barriers, so a fixed input's rows are all in.
        self.forget_unfixed();
        r.finish()
    }

    /// Counts the barrier for the least-recently-used order, deletes the spilled copies
    /// of keys that emptied, and spills keys if the memory pool is over its limit.
    async fn on_barrier(&mut self, _barrier: &Barrier, _out: &mut Output) -> Result<()> {
        self.forget_unfixed();
        self.left.clock += 1;
        self.right.clock += 1;
        let Some(spill) = &self.spill else { return Ok(()) };
        if spill.store.is_some() {
            self.sync(SyncKeys::None)?;
        }
        let memory = self.left.memory + self.right.memory;
        let Some(target) = self.spill.as_ref().and_then(|spill| spill.report(memory)) else { return Ok(()) };
        self.evict(target)?;
        if let Some(spill) = &self.spill {
            spill.report(self.left.memory + self.right.memory);
        }
        Ok(())
    }

    /// A join's output may pair a new row with an old one from the other side, so only a
    /// window join's time column gets a watermark: the lesser of its two sides'.
    async fn on_watermark(&mut self, port: usize, watermark: Watermark, out: &mut Output) -> Result<()> {
        if let Some(interval) = &mut self.interval
            && port < 2
            && watermark.column == interval.columns[port]
        {
            let slot = &mut interval.watermarks[port];
            *slot = Some(slot.map_or(watermark.value, |w| w.max(watermark.value)));
            self.forget_unreachable();
        }
        let Some(event_time) = &mut self.event_time else { return Ok(()) };
        if port > 1 || watermark.column != event_time.columns[port] {
            return Ok(());
        }
        let slot = &mut event_time.watermarks[port];
        *slot = Some(slot.map_or(watermark.value, |w| w.max(watermark.value)));
        let [Some(left), Some(right)] = event_time.watermarks else { return Ok(()) };
        let least = left.min(right);
        if event_time.forwarded.is_some_and(|f| f >= least) {
            return Ok(());
        }
        event_time.forwarded = Some(least);
        for &column in &event_time.outputs {
            out.watermark(Watermark { column, value: least });
        }
        self.forget_before(least);
        Ok(())
    }

    async fn process(&mut self, port: usize, input: ChangeBatch, out: &mut Output) -> Result<()> {
        if self.filter.is_some() && self.kind != JoinKind::Inner {
            return self.process_with_condition(port, input, out);
        }
        let (keys, rows) = self.encode(port, input.batch())?;
        self.remember_times(port, input.batch(), &keys)?;
        self.load_spilled(&keys)?;
        let interval_times = match &self.interval {
            Some(interval) => {
                let times = cast(input.batch().column(interval.columns[port]), &DataType::Int64)?;
                Some(
                    times
                        .as_any()
                        .downcast_ref::<Int64Array>()
                        .cloned()
                        .ok_or_else(|| Error::Internal("event times did not cast to integers".into()))?,
                )
            }
            None => None,
        };
        let kind = self.kind;
        let mut pieces: Vec<Piece<&[u8]>> = Vec::new();
        // The other side's unmatched rows appear or disappear as this side's keys go between
        // zero and non-zero weight.
        let other_reacts = match (port, kind) {
            (0, _) => kind.pads_right(),
            (_, JoinKind::LeftSemi | JoinKind::LeftAnti) => true,
            _ => kind.pads_left(),
        };
        // Keys whose weight on this side changes, with the weight before the change.
        let mut before: FastMap<Box<[u8]>, i64> = FastMap::default();
        let keeps_rows = self.unkept_input() != Some(port);
        let (this, other) = if port == 0 { (&mut self.left, &self.right) } else { (&mut self.right, &self.left) };
        let pads_this = if port == 0 { kind.pads_left() } else { kind.pads_right() };
        for (i, key) in keys.iter().enumerate() {
            let w = input.weights().value(i);
            let row = rows.row(i).data();
            let Some(key) = key else {
                // A NULL key matches nothing: only padding (or the anti join) sees the row.
                if pads_this {
                    pieces.push(if port == 0 { (Some(row), None, w) } else { (None, Some(row), w) });
                } else if port == 0 && kind == JoinKind::LeftAnti {
                    pieces.push((Some(row), None, w));
                }
                continue;
            };
            let matches = other.by_key.get(key);
            let other_weight = matches.map_or(0, |m| m.weight);
            if kind.pairs()
                && let Some(matches) = matches
            {
                for (other_row, count) in matches.rows.iter() {
                    let (l, r) = if port == 0 { (row, other_row) } else { (other_row, row) };
                    pieces.push((Some(l), Some(r), w * count));
                }
            }
            match (port, kind) {
                (0, JoinKind::LeftSemi) if other_weight != 0 => pieces.push((Some(row), None, w)),
                (0, JoinKind::LeftAnti) if other_weight == 0 => pieces.push((Some(row), None, w)),
                _ if pads_this && other_weight == 0 => {
                    pieces.push(if port == 0 { (Some(row), None, w) } else { (None, Some(row), w) })
                }
                _ => {}
            }
            if other_reacts && !before.contains_key(key) {
                before.insert(key.into(), this.weight_of(key));
            }
            if !keeps_rows {
                continue;
            }
            this.add(key, row, w);
            if let (Some(times), Some(interval)) = (&interval_times, &mut self.interval)
                && times.is_valid(i)
                && w > 0
            {
                interval.by_time[port].entry(times.value(i)).or_default().push(key, row);
            }
        }
        if other_reacts {
            for (key, old) in before {
                let new = this.weight_of(&key);
                if (old == 0) == (new == 0) {
                    continue;
                }
                let Some(other_rows) = other.by_key.get(&key).map(|a| &a.rows) else { continue };
                // Sign of the change in "other side has no match": + when matches vanish.
                let unmatched_sign = if new == 0 { 1 } else { -1 };
                for (other_row, count) in other_rows.iter() {
                    let piece = match (port, kind) {
                        (_, JoinKind::LeftSemi) => (Some(other_row), None, -unmatched_sign * count),
                        (_, JoinKind::LeftAnti) => (Some(other_row), None, unmatched_sign * count),
                        (0, _) => (None, Some(other_row), unmatched_sign * count),
                        _ => (Some(other_row), None, unmatched_sign * count),
                    };
                    pieces.push(piece);
                }
            }
        }
        if let Some(change) = self.build(pieces)? {
            out.push(change);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use datafusion::arrow::datatypes::{Field, Schema};
    use datafusion::physical_expr::expressions::Column;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::dataflow::operators::testing::{checkpointed_and_restored, feed};
    use crate::state::spill::MemoryPool;

    #[test]
    fn a_side_holds_what_was_added_whether_a_key_has_one_row_or_many() {
        let mut side = join(JoinKind::Inner).left;
        let mut rng = rand::rngs::SmallRng::seed_from_u64(5);
        let mut model: BTreeMap<(u8, u8), i64> = BTreeMap::new();
        let mut one_row_keys = 0;
        for step in 0..6000 {
            // Keys 0..20 with rows 0..3, growing over the first half, then shrinking.
            let (key, row) = (rng.gen_range(0..20u8), rng.gen_range(0..3u8));
            let held = model.get(&(key, row)).copied().unwrap_or(0);
            if step % 7 == 0 && held != 0 {
                side.forget(&[key], &[row]);
                model.remove(&(key, row));
            } else {
                let w = match (step < 3000, held) {
                    (true, _) => rng.gen_range(-1..3),
                    (false, 0) => 0,
                    (false, held) => -held.signum() * rng.gen_range(1..=held.abs()),
                };
                assert_eq!(side.add(&[key], &[row], w), held, "step {step}: the count before adding {w}");
                model.insert((key, row), held + w);
                model.retain(|_, n| *n != 0);
            }
            let mut got: Vec<((u8, u8), i64)> = Vec::new();
            let mut memory = 0;
            for (k, arranged) in &side.by_key {
                let rows: Vec<_> = arranged.rows.iter().map(|(r, n)| ((k[0], r[0]), n)).collect();
                assert!(!rows.is_empty(), "step {step}: key {k:?} is held with no rows");
                assert_eq!(arranged.weight, rows.iter().map(|(_, n)| n).sum::<i64>(), "step {step}: weight");
                assert_eq!(arranged.bytes, key_bytes(k) + rows.len() * row_bytes(&[0]), "step {step}: bytes");
                one_row_keys += usize::from(matches!(arranged.rows, KeyRows::One(..)));
                memory += arranged.bytes;
                got.extend(rows);
            }
            got.sort();
            assert_eq!(got, model.iter().map(|(k, n)| (*k, *n)).collect::<Vec<_>>(), "step {step}");
            assert_eq!(side.memory, memory, "step {step}: memory");
            for key in 0..20u8 {
                let weight: i64 = model.range((key, 0)..=(key, u8::MAX)).map(|(_, n)| n).sum();
                assert_eq!(side.weight_of(&[key]), weight, "step {step}: weight of key {key}");
            }
        }
        assert!(one_row_keys > 1000, "keys with one row were seen held as one: {one_row_keys}");
        assert!(model.len() < 20, "the side shrank again: {} rows", model.len());
    }

    #[test]
    fn pairs_of_one_time_read_back_as_they_were_pushed() {
        let mut pairs = KeyedRows::default();
        let pushed: Vec<(Vec<u8>, Vec<u8>)> =
            vec![(vec![1], vec![2, 3]), (vec![], vec![4]), (vec![5, 6, 7], vec![]), (vec![8], vec![9])];
        for (key, row) in &pushed {
            pairs.push(key, row);
        }
        assert_eq!(pairs.len(), pushed.len());
        let read: Vec<(Vec<u8>, Vec<u8>)> = pairs.iter().map(|(k, r)| (k.to_vec(), r.to_vec())).collect();
        assert_eq!(read, pushed);
    }

    #[tokio::test]
    async fn a_constant_input_matches_rows_that_came_before_it_and_after_them_keeps_none() {
        let input = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, true),
            Field::new("v", DataType::Int64, false),
        ]));
        let change = |rows: &[(i64, i64)], weight: i64| {
            let (k, v): (Vec<i64>, Vec<i64>) = rows.iter().copied().unzip();
            let batch =
                RecordBatch::try_new(input.clone(), vec![Arc::new(Int64Array::from(k)), Arc::new(Int64Array::from(v))])
                    .expect("batch");
            ChangeBatch::try_new(batch, Int64Array::from(vec![weight; rows.len()])).expect("change")
        };
        let barrier = Barrier { epoch: 1, checkpoint: false, mutation: None };
        let mut operator = join(JoinKind::Inner).with_fixed_input(1);
        let mut got = BTreeMap::new();
        // In the first epoch the left rows may come before the constant's.
        feed(&mut operator, 0, change(&[(1, 10), (2, 20)], 1), None, &mut got).await;
        feed(&mut operator, 1, change(&[(1, 100), (2, 200), (2, 201)], 1), Some(&barrier), &mut got).await;
        assert!(operator.left.by_key.is_empty(), "after the first barrier no left row is kept");
        assert_eq!(operator.right.by_key.len(), 2, "the constant's rows are kept");
        // Later rows, and retractions of rows from before, pair with the constant alone.
        feed(&mut operator, 0, change(&[(2, 21), (3, 30)], 1), None, &mut got).await;
        feed(&mut operator, 0, change(&[(2, 20)], -1), Some(&barrier), &mut got).await;
        assert!(operator.left.by_key.is_empty(), "later left rows are not kept either");
        let expected: BTreeMap<String, i64> =
            ["1|10|1|100", "2|21|2|200", "2|21|2|201"].into_iter().map(|row| (row.to_string(), 1)).collect();
        assert_eq!(got, expected);
    }

    /// `l JOIN r ON l.k = r.k` of `kind`, over inputs (k, v) of integers.
    fn join(kind: JoinKind) -> JoinOperator {
        let mut fields = vec![Field::new("lk", DataType::Int64, true), Field::new("lv", DataType::Int64, true)];
        if kind.pairs() {
            fields.extend([Field::new("rk", DataType::Int64, true), Field::new("rv", DataType::Int64, true)]);
        }
        let key = |_| -> Arc<dyn PhysicalExpr> { Arc::new(Column::new("k", 0)) };
        let types = vec![DataType::Int64, DataType::Int64];
        JoinOperator::new(
            kind,
            vec![key(0)],
            vec![key(1)],
            vec![DataType::Int64],
            types.clone(),
            types,
            None,
            Arc::new(Schema::new(fields)),
        )
        .expect("join")
    }

    /// The oracle for spilling: for each kind of join, an operator over a pool far too
    /// small for its arrangements, restored from its checkpoint's files midway, emits
    /// exactly what one that keeps everything in memory emits, through inserts and
    /// retractions on both sides that reach spilled keys and empty them.
    #[tokio::test]
    async fn spilled_and_restored_joins_give_the_same_answer_as_joins_in_memory() {
        let input = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, true),
            Field::new("v", DataType::Int64, false),
        ]));
        for kind in [JoinKind::Inner, JoinKind::Left, JoinKind::Full, JoinKind::LeftSemi, JoinKind::LeftAnti] {
            let dir = tempfile::tempdir().expect("tempdir");
            let pool = MemoryPool::new(Some(48 << 10));
            let local = |name: &str| LocalState { dir: dir.path().join(name), pool: pool.clone(), owner: (1, 0) };
            let mut memory = join(kind);
            let mut spilling = join(kind);
            spilling.set_local_state(local("a"));
            let (mut expected, mut got) = (BTreeMap::new(), BTreeMap::new());
            // Live rows per side, to retract some of them later.
            let mut live: [Vec<(Option<i64>, i64)>; 2] = Default::default();
            let mut rng = rand::rngs::SmallRng::seed_from_u64(kind as u64);
            for round in 0..40 {
                for port in [0, 1] {
                    // New rows over 2000 keys (a few NULL), and retractions of earlier ones.
                    let mut rows: Vec<(Option<i64>, i64, i64)> = (0..150)
                        .map(|_| (rng.gen_bool(0.98).then(|| rng.gen_range(0..2000)), rng.gen_range(0..5), 1))
                        .collect();
                    for _ in 0..60 {
                        if !live[port].is_empty() {
                            let i = rng.gen_range(0..live[port].len());
                            let (k, v) = live[port].swap_remove(i);
                            rows.push((k, v, -1));
                        }
                    }
                    live[port].extend(rows.iter().filter(|r| r.2 == 1).map(|r| (r.0, r.1)));
                    let batch = RecordBatch::try_new(
                        input.clone(),
                        vec![
                            Arc::new(Int64Array::from(rows.iter().map(|r| r.0).collect::<Vec<_>>())),
                            Arc::new(Int64Array::from(rows.iter().map(|r| r.1).collect::<Vec<_>>())),
                        ],
                    )
                    .expect("batch");
                    let weights = Int64Array::from(rows.iter().map(|r| r.2).collect::<Vec<_>>());
                    let change = ChangeBatch::try_new(batch, weights).expect("change");
                    // Every other round, both sides change in one epoch: a key emptied by
                    // one batch can come back in the next before the barrier.
                    let barrier = (port == 1 || round % 2 == 0).then_some(Barrier {
                        epoch: round,
                        checkpoint: false,
                        mutation: None,
                    });
                    for (operator, into) in [(&mut memory, &mut expected), (&mut spilling, &mut got)] {
                        feed(operator, port, change.clone(), barrier.as_ref(), into).await;
                    }
                }
                assert_eq!(got, expected, "{kind:?}, round {round}");
                if round == 20 {
                    spilling = checkpointed_and_restored(spilling, dir.path(), local("b"), join(kind));
                }
            }
            let resident = spilling.left.by_key.len() + spilling.right.by_key.len();
            let all = memory.left.by_key.len() + memory.right.by_key.len();
            assert!(resident * 2 < all, "{kind:?}: most keys are spilled ({resident} of {all} in memory)");
            let in_memory = spilling.left.memory + spilling.right.memory;
            assert!(in_memory <= 48 << 10, "{kind:?}: memory stays within the pool's limit: {in_memory}");
            assert!(expected.len() > 200, "{kind:?}: the join has rows: {}", expected.len());
        }
    }
}
