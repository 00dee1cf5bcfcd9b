//! [`AggregateOperator`]: GROUP BY with accumulators that can retract.
//!
//! Each group keeps the sum of its input weights and one accumulator per aggregate: count
//! and sum by adding `weight × value`, avg as sum and count, variance and standard
//! deviation as count, sum and sum of squares, min and max as a multiset of values (so
//! deleting the current extreme finds the next one), string_agg and array_agg as a multiset
//! of values emitted in value order. Changes are folded in as they arrive; at each barrier
//! the operator emits, for every group that changed, a retraction of the row it emitted
//! before and an insertion of its new row. A group whose weight drops to zero emits only
//! the retraction, and its state is freed. Without GROUP BY there is one group,
//! which always has a row (count 0, other aggregates NULL), as in SQL.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::{
    Array, ArrayRef, BooleanArray, BooleanBuilder, Float64Array, Float64Builder, Int64Array, Int64Builder, ListArray,
    RecordBatchOptions, StringArray, StringBuilder, UInt32Array, new_null_array,
};
use datafusion::arrow::buffer::{NullBuffer, OffsetBuffer};
use datafusion::arrow::compute::{SortOptions, cast, take};
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::arrow::row::{RowConverter, Rows, SortField};
use datafusion::physical_plan::PhysicalExpr;

use crate::dataflow::checkpoint::{LocalStore, StateReader, StateWriter};
use crate::dataflow::operator::{Barrier, Operator, Output};
use crate::dataflow::watermark::Derivation;
use crate::dataflow::{ChangeBatch, FastMap, Watermark};
use crate::error::{Error, Result};
use crate::state::spill::{LocalState, SpillStore, StateFile};

/// The aggregate functions the operator maintains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AggregateFunction {
    /// `count(*)`: rows in the group.
    CountRows,
    /// `count(x)`: non-NULL values.
    Count,
    /// `count(DISTINCT x)`: distinct non-NULL values.
    CountDistinct,
    /// `sum(x)` over integers (output Int64) or floats (output Float64).
    Sum,
    /// `avg(x)`, output Float64.
    Avg,
    Min,
    Max,
    /// `bool_and(x)`: true when every non-NULL value is true.
    BoolAnd,
    /// `bool_or(x)`: true when any value is true.
    BoolOr,
    /// `var_samp`/`var_pop` (and `stddev_samp`/`stddev_pop` with `root`), output Float64.
    Variance {
        population: bool,
        root: bool,
    },
    /// `string_agg(x, delimiter)`: the non-NULL values joined, in value order.
    StringAgg,
    /// `array_agg(x)`: every value, NULLs included, in value order.
    ArrayAgg,
    /// Any other DataFusion aggregate (`approx_percentile_cont`, `percentile_cont`,
    /// `median`, `approx_distinct`, …), run with its own accumulator per group; rows can be
    /// taken back only where the accumulator supports it (else the input must be
    /// append-only, which lowering checks).
    DataFusion,
}

/// One aggregate of the query: its function, argument and the type of its result.
#[derive(Clone)]
pub struct AggregateSpec {
    pub function: AggregateFunction,
    /// `None` for `count(*)`.
    pub argument: Option<Arc<dyn PhysicalExpr>>,
    pub output_type: DataType,
    /// The separator of `string_agg`.
    pub delimiter: String,
    /// `string_agg`/`array_agg` values in descending order (`ORDER BY x DESC`).
    pub descending: bool,
    /// `array_agg` puts NULL elements first.
    pub nulls_first: bool,
    /// The argument's type, where the accumulator encodes values (`count(DISTINCT x)`).
    pub argument_type: Option<DataType>,
    /// For [`AggregateFunction::DataFusion`]: the aggregate, which makes accumulators and
    /// names its argument expressions.
    pub datafusion: Option<Arc<datafusion::physical_expr::aggregate::AggregateFunctionExpr>>,
    /// The input never takes a row back (lowering knows from the plan), so `min`/`max`
    /// keep only the best value so far instead of every value with its count.
    pub append_only: bool,
}

impl AggregateSpec {
    pub fn new(function: AggregateFunction, argument: Option<Arc<dyn PhysicalExpr>>, output_type: DataType) -> Self {
        AggregateSpec {
            function,
            argument,
            output_type,
            delimiter: String::new(),
            descending: false,
            nulls_first: false,
            argument_type: None,
            datafusion: None,
            append_only: false,
        }
    }

    /// The type values are encoded as, for the functions that keep every value.
    fn value_type(&self) -> Option<DataType> {
        match (&self.function, &self.output_type) {
            (AggregateFunction::Min | AggregateFunction::Max, t) => Some(t.clone()),
            (AggregateFunction::StringAgg, _) => Some(DataType::Utf8),
            (AggregateFunction::CountDistinct, _) if self.distinct_ints() => None,
            (AggregateFunction::CountDistinct, _) => self.argument_type.clone(),
            (AggregateFunction::ArrayAgg, DataType::List(item)) => Some(item.data_type().clone()),
            _ => None,
        }
    }

    /// `count(DISTINCT x)` whose values are integers as Int64 (one to one), kept as such
    /// rather than encoded.
    fn distinct_ints(&self) -> bool {
        self.function == AggregateFunction::CountDistinct
            && self.argument_type.as_ref().is_some_and(|t| {
                matches!(
                    t,
                    DataType::Int8
                        | DataType::Int16
                        | DataType::Int32
                        | DataType::Int64
                        | DataType::UInt8
                        | DataType::UInt16
                        | DataType::UInt32
                        | DataType::Date32
                        | DataType::Timestamp(..)
                )
            })
    }
}

/// Per-aggregate state of one group. A group holds one per aggregate, so the variants
/// that need more than three words keep their state in a box: the enum stays 32 bytes.
#[derive(Debug)]
enum Accumulator {
    /// A DataFusion aggregate's own accumulator.
    DataFusion(Box<dyn datafusion::logical_expr::Accumulator>),
    Count(i64),
    SumInt {
        sum: Wide,
        values: i64,
    },
    SumFloat {
        sum: f64,
        values: i64,
    },
    /// Encoded values (sortable row format) and how many times each occurs.
    Extreme(BTreeMap<Box<[u8]>, i64>),
    /// `min`/`max` over an append-only input: the best encoded value so far.
    Best {
        value: Option<Box<[u8]>>,
        max: bool,
    },
    /// How many true and false values the group holds.
    Bools {
        trues: i64,
        falses: i64,
    },
    Moments(Box<Moments>),
    /// `count(DISTINCT x)` over integers (and times): each value with how many rows hold it.
    DistinctInts(Box<FastMap<i64, i64>>),
    /// `count(DISTINCT x)` over other types: each encoded value with how many rows hold it.
    Distinct(Box<FastMap<Box<[u8]>, i64>>),
    Values(Box<Collected>),
}

const _: () = assert!(std::mem::size_of::<Accumulator>() <= 32, "groups hold one accumulator per aggregate");

/// An i128 in two words, so that the accumulator holding it needs no 16-byte alignment.
#[derive(Debug, Clone, Copy, Default)]
struct Wide([u64; 2]);

impl Wide {
    fn new(value: i128) -> Wide {
        Wide([value as u64, ((value as u128) >> 64) as u64])
    }

    fn get(self) -> i128 {
        (((self.0[1] as u128) << 64) | self.0[0] as u128) as i128
    }
}

/// Count, sum and sum of squares for variance. Integers are summed exactly; floats as f64
/// (retractions may leave rounding residue in the last digits).
#[derive(Debug, Default)]
struct Moments {
    n: i64,
    sum: f64,
    squares: f64,
    /// Exact sum and sum of squares of integer values; `None` once they overflowed (the
    /// float sums take over) or for float values.
    exact: Option<(i128, i128)>,
}

/// Every value (encoded in order) with its count, and the number of NULLs: the state of
/// string_agg and array_agg.
#[derive(Debug, Default)]
struct Collected {
    values: BTreeMap<Box<[u8]>, i64>,
    nulls: i64,
}

impl Accumulator {
    /// Writes the accumulator for a checkpoint; false for a DataFusion accumulator, whose
    /// state freshet cannot write.
    fn write(&self, w: &mut StateWriter) -> bool {
        match self {
            Accumulator::DataFusion(_) => return false,
            Accumulator::Count(n) => {
                w.u64(0);
                w.i64(*n);
            }
            Accumulator::SumInt { sum, values } => {
                w.u64(1);
                w.i128(sum.get());
                w.i64(*values);
            }
            Accumulator::SumFloat { sum, values } => {
                w.u64(2);
                w.f64(*sum);
                w.i64(*values);
            }
            Accumulator::Extreme(values) => {
                w.u64(3);
                w.counts(values.len(), values.iter().map(|(k, n)| (k.as_ref(), *n)));
            }
            Accumulator::Bools { trues, falses } => {
                w.u64(4);
                w.i64(*trues);
                w.i64(*falses);
            }
            Accumulator::Moments(moments) => {
                let Moments { n, sum, squares, exact } = moments.as_ref();
                w.u64(5);
                w.i64(*n);
                w.f64(*sum);
                w.f64(*squares);
                w.u64(exact.is_some() as u64);
                let (s, q) = exact.unwrap_or_default();
                w.i128(s);
                w.i128(q);
            }
            Accumulator::Values(collected) => {
                let Collected { values, nulls } = collected.as_ref();
                w.u64(6);
                w.counts(values.len(), values.iter().map(|(k, n)| (k.as_ref(), *n)));
                w.i64(*nulls);
            }
            Accumulator::Best { value, max } => {
                w.u64(7);
                w.u64(*max as u64);
                w.u64(value.is_some() as u64);
                w.bytes(value.as_deref().unwrap_or_default());
            }
            Accumulator::DistinctInts(values) => {
                w.u64(8);
                w.u64(values.len() as u64);
                for (value, count) in values.iter() {
                    w.i64(*value);
                    w.i64(*count);
                }
            }
            Accumulator::Distinct(values) => {
                w.u64(9);
                w.counts(values.len(), values.iter().map(|(k, n)| (k.as_ref(), *n)));
            }
        }
        true
    }

    fn read(r: &mut StateReader) -> Result<Accumulator> {
        Ok(match r.u64()? {
            0 => Accumulator::Count(r.i64()?),
            1 => Accumulator::SumInt { sum: Wide::new(r.i128()?), values: r.i64()? },
            2 => Accumulator::SumFloat { sum: r.f64()?, values: r.i64()? },
            3 => Accumulator::Extreme(r.counts()?.into_iter().collect()),
            4 => Accumulator::Bools { trues: r.i64()?, falses: r.i64()? },
            5 => {
                let (n, sum, squares, exact) = (r.i64()?, r.f64()?, r.f64()?, r.u64()? != 0);
                let (s, q) = (r.i128()?, r.i128()?);
                Accumulator::Moments(Box::new(Moments { n, sum, squares, exact: exact.then_some((s, q)) }))
            }
            6 => {
                Accumulator::Values(Box::new(Collected { values: r.counts()?.into_iter().collect(), nulls: r.i64()? }))
            }
            7 => {
                let (max, present) = (r.u64()? != 0, r.u64()? != 0);
                let bytes = r.bytes()?;
                Accumulator::Best { value: present.then(|| Box::from(bytes)), max }
            }
            8 => {
                let n = r.len(16)?;
                let mut values = FastMap::with_capacity_and_hasher(n, Default::default());
                for _ in 0..n {
                    values.insert(r.i64()?, r.i64()?);
                }
                Accumulator::DistinctInts(Box::new(values))
            }
            9 => Accumulator::Distinct(Box::new(r.counts()?.into_iter().collect())),
            tag => {
                return Err(Error::Corrupt {
                    location: "checkpointed state of an aggregate".into(),
                    reason: format!("unknown accumulator {tag}"),
                });
            }
        })
    }
}

/// An encoded group key, shared by the index, its group and the groups by event time:
/// one allocation per group instead of one each.
type GroupKey = Arc<[u8]>;

struct Group {
    /// The encoded group key; `None` for the one group of a global aggregate.
    key: Option<GroupKey>,
    weight: i64,
    accumulators: Vec<Accumulator>,
    /// The row this group last emitted (encoded by the output converter), to retract it
    /// when the group changes.
    emitted: Option<Box<[u8]>>,
    dirty: bool,
    /// Estimated bytes it takes in memory.
    bytes: usize,
    /// The barrier count when it last changed, to spill the least recently used first.
    used: u64,
    /// Its spilled copy (if any) equals it: it need not be written again.
    synced: bool,
}

/// Estimated bytes of a group apart from its values: the index entry, the key (shared),
/// the emitted row and the accumulators.
fn group_bytes(key: usize, aggregates: usize) -> usize {
    176 + 2 * key + 32 * aggregates
}

/// Estimated bytes of one value kept by min/max, count(DISTINCT), string_agg or array_agg.
fn value_bytes(value: &[u8]) -> usize {
    value.len() + 48
}

/// Estimated bytes of one integer kept by count(DISTINCT): the entry and its share of the
/// hash table's spare room.
const INT_VALUE_BYTES: usize = 24;

/// An aggregate state at least this large is checkpointed into its spill store (so later
/// checkpoints upload only what changed) rather than written whole each time.
const INCREMENTAL_FROM: usize = 4 << 20;

/// An argument evaluated for one batch, in the form its accumulator reads.
enum Argument {
    None,
    Ints(Int64Array),
    Floats(Float64Array),
    /// Encoded values for min/max, with the values themselves for their validity.
    Rows(Rows, ArrayRef),
    Bools(BooleanArray),
    Any(ArrayRef),
    /// A DataFusion aggregate's argument columns (its rows go in per group, after the loop).
    Columns(Vec<ArrayRef>),
}

/// GROUP BY `groups` computing `aggregates`; output columns are the groups, then the
/// aggregates, in `schema`.
pub struct AggregateOperator {
    groups: Vec<Arc<dyn PhysicalExpr>>,
    aggregates: Vec<AggregateSpec>,
    schema: SchemaRef,
    key_converter: RowConverter,
    /// One converter per min/max aggregate (index-aligned with `aggregates`).
    value_converters: Vec<Option<RowConverter>>,
    output_converter: RowConverter,
    index: FastMap<GroupKey, usize>,
    state: Vec<Group>,
    /// Slots of groups that emptied, reused by new groups (so memory follows the live
    /// groups, not every key ever seen).
    free: Vec<usize>,
    /// Ids of groups changed since the last barrier.
    dirty: Vec<usize>,
    /// Groups keyed by event time, closed and forgotten as its watermark passes.
    event_time: Option<EventTime>,
    /// Estimated bytes of the groups in memory.
    memory: usize,
    /// Barriers seen.
    clock: u64,
    /// Where groups spill (set by the runtime; unset in unit tests). Its store opens
    /// when groups first spill, or when a checkpoint first goes through it.
    spill: Option<LocalStore>,
    /// Said once that the state is over the memory limit but cannot spill.
    warned: bool,
}

/// A group column that is a non-decreasing function of an input column with watermarks
/// (such as `window_start`): once the watermark passes a group's value there, no change
/// can reach the group again, so its state is freed (its output row stays emitted).
struct EventTime {
    /// The group position.
    group: usize,
    /// Output watermarks of the group columns from input watermarks.
    derivation: Derivation,
    /// Group keys (encoded) by their value in the event-time column.
    groups_by_time: BTreeMap<i64, Vec<GroupKey>>,
    /// Watermarks received since the last barrier, by output column.
    pending: BTreeMap<usize, i64>,
}

impl AggregateOperator {
    /// `group_types` are the types of the group expressions, in order.
    pub fn new(
        groups: Vec<Arc<dyn PhysicalExpr>>,
        group_types: Vec<DataType>,
        aggregates: Vec<AggregateSpec>,
        schema: SchemaRef,
    ) -> Result<Self> {
        let key_converter = RowConverter::new(group_types.into_iter().map(SortField::new).collect())?;
        let value_converters = aggregates
            .iter()
            .map(|a| match a.value_type() {
                Some(t) => {
                    let options = SortOptions { descending: a.descending, nulls_first: false };
                    RowConverter::new(vec![SortField::new_with_options(t, options)]).map(Some)
                }
                None => Ok(None),
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let output_converter =
            RowConverter::new(schema.fields().iter().map(|f| SortField::new(f.data_type().clone())).collect())?;
        let mut operator = AggregateOperator {
            groups,
            aggregates,
            schema,
            key_converter,
            value_converters,
            output_converter,
            index: FastMap::default(),
            state: Vec::new(),
            free: Vec::new(),
            dirty: Vec::new(),
            event_time: None,
            memory: 0,
            clock: 0,
            spill: None,
            warned: false,
        };
        if operator.groups.is_empty() {
            // The global aggregate's one group exists from the start.
            operator.insert_group(GroupKey::from([] as [u8; 0]), None)?;
        }
        Ok(operator)
    }

    /// Closes groups by their column `group`, whose watermarks follow from those of the
    /// columns of `input` (the input's schema).
    pub fn with_event_time(mut self, group: usize, input: SchemaRef) -> Self {
        let groups = self.schema.fields()[..self.groups.len()].to_vec();
        let output = Arc::new(datafusion::arrow::datatypes::Schema::new(groups));
        let derivation = Derivation::new(input, output, &self.groups);
        self.event_time =
            Some(EventTime { group, derivation, groups_by_time: BTreeMap::new(), pending: BTreeMap::new() });
        self
    }

    /// Frees the groups whose event time is below `watermark`: no change can reach them.
    /// Returns their keys (spilled copies are deleted with them).
    fn close_groups(&mut self, watermark: i64) -> Vec<GroupKey> {
        let Some(event_time) = &mut self.event_time else { return Vec::new() };
        let open = event_time.groups_by_time.split_off(&watermark);
        let closed = std::mem::replace(&mut event_time.groups_by_time, open);
        let keys: Vec<GroupKey> = closed.into_values().flatten().collect();
        for key in &keys {
            if let Some(id) = self.index.remove(key.as_ref()) {
                self.forget_group(id);
            }
        }
        keys
    }

    /// Frees slot `id` (already out of the index).
    fn forget_group(&mut self, id: usize) {
        let group = &mut self.state[id];
        group.key = None;
        group.emitted = None;
        group.accumulators = Vec::new();
        self.memory = self.memory.saturating_sub(group.bytes);
        group.bytes = 0;
        self.free.push(id);
    }

    /// Whether groups can be written out: with GROUP BY, and only built-in accumulators.
    fn spillable(&self) -> bool {
        !self.groups.is_empty() && self.aggregates.iter().all(|a| a.function != AggregateFunction::DataFusion)
    }

    /// A group's state as a spilled value or in a checkpoint; false if it holds a
    /// DataFusion accumulator.
    fn write_group(w: &mut StateWriter, group: &Group) -> bool {
        w.u64(group.key.is_some() as u64);
        w.i64(group.weight);
        match &group.emitted {
            Some(row) => {
                w.u64(1);
                w.bytes(row);
            }
            None => w.u64(0),
        }
        group.accumulators.iter().all(|a| a.write(w))
    }

    fn read_group(&self, r: &mut StateReader, bytes: &[u8]) -> Result<Group> {
        let key = match r.u64()? {
            0 => None,
            _ => Some(GroupKey::from(bytes)),
        };
        let weight = r.i64()?;
        let emitted = match r.u64()? {
            0 => None,
            _ => Some(Box::from(r.bytes()?)),
        };
        let accumulators: Vec<Accumulator> = self
            .aggregates
            .iter()
            .map(|spec| Accumulator::read(r).and_then(|acc| upgraded(spec, acc)))
            .collect::<Result<_>>()?;
        let values: usize = accumulators
            .iter()
            .map(|a| match a {
                Accumulator::Extreme(values) => values.keys().map(|v| value_bytes(v)).sum(),
                Accumulator::Values(collected) => collected.values.keys().map(|v| value_bytes(v)).sum(),
                Accumulator::Distinct(values) => values.keys().map(|v| value_bytes(v)).sum(),
                Accumulator::DistinctInts(values) => values.len() * INT_VALUE_BYTES,
                Accumulator::Best { value: Some(v), .. } => value_bytes(v),
                _ => 0,
            })
            .sum();
        let bytes = group_bytes(bytes.len(), self.aggregates.len()) + values;
        Ok(Group { key, weight, accumulators, emitted, dirty: false, bytes, used: self.clock, synced: true })
    }

    /// Puts a group read back from the spill store into memory; returns its slot.
    fn load_group(&mut self, key: &[u8], value: &[u8]) -> Result<usize> {
        let mut r = StateReader::new(value, "a spilled aggregate group");
        let group = self.read_group(&mut r, key)?;
        r.finish()?;
        let index_key = group.key.clone().unwrap_or_else(|| GroupKey::from(key));
        let id = self.place(group);
        self.index.insert(index_key, id);
        Ok(id)
    }

    /// Puts `group` in a free slot (or a new one) and counts its memory; returns the slot.
    fn place(&mut self, group: Group) -> usize {
        self.memory += group.bytes;
        match self.free.pop() {
            Some(id) => {
                self.state[id] = group;
                id
            }
            None => {
                self.state.push(group);
                self.state.len() - 1
            }
        }
    }

    /// The spill store, opened if need be; `None` where groups cannot spill.
    fn store(&mut self) -> Result<Option<&mut SpillStore>> {
        if !self.spillable() {
            return Ok(None);
        }
        let Some(spill) = &mut self.spill else { return Ok(None) };
        spill.open("aggregate state").map(Some)
    }

    /// A group's spilled value, if groups have spilled and this one is among them.
    fn spilled(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        match self.spill.as_ref().and_then(|s| s.store.as_ref()) {
            Some(store) => store.get(key),
            None => Ok(None),
        }
    }

    /// Writes the groups in memory that changed since they were last written, and deletes
    /// `deleted`, in the spill store (which must be open).
    fn sync(&mut self, ids: &[usize], deleted: &[GroupKey]) -> Result<()> {
        let mut values = Vec::new();
        for &id in ids {
            let group = &mut self.state[id];
            if group.synced || group.key.is_none() {
                continue;
            }
            let mut w = StateWriter::with_capacity(group.bytes);
            if !Self::write_group(&mut w, group) {
                return Err(Error::Internal("a spilled group holds a DataFusion accumulator".into()));
            }
            group.synced = true;
            let key = group.key.as_ref().map(|k| k.to_vec()).unwrap_or_default();
            values.push((key, w.finish()));
        }
        let keyed: Vec<(&[u8], Option<&[u8]>)> = values
            .iter()
            .map(|(key, value)| (key.as_slice(), Some(value.as_slice())))
            .chain(deleted.iter().map(|k| (k.as_ref(), None)))
            .collect();
        let spill = self.spill.as_ref().and_then(|s| s.store.as_ref());
        spill.ok_or_else(|| Error::Internal("writing groups without a spill store".into()))?.write(keyed)
    }

    /// Moves the least recently used groups to the spill store until memory is at most
    /// `target` bytes.
    fn evict(&mut self, target: usize) -> Result<()> {
        if self.store()?.is_none() {
            if self.spill.is_some() && !self.warned {
                self.warned = true;
                tracing::warn!(
                    "over the memory limit, but this aggregate's state cannot spill (DataFusion accumulators or no GROUP BY)"
                );
            }
            return Ok(());
        }
        let mut by_use: Vec<(u64, usize)> = self.index.values().map(|&id| (self.state[id].used, id)).collect();
        by_use.sort_unstable();
        let mut freed = 0;
        let over = self.memory.saturating_sub(target);
        let victims: Vec<usize> = by_use
            .into_iter()
            .take_while(|(_, id)| {
                let more = freed < over;
                freed += self.state[*id].bytes;
                more
            })
            .map(|(_, id)| id)
            .collect();
        self.sync(&victims, &[])?;
        for id in victims {
            if let Some(key) = &self.state[id].key {
                self.index.remove(key.as_ref());
            }
            self.forget_group(id);
        }
        Ok(())
    }

    /// A new group under `index_key` in the index, `key` its group key (`None` for the
    /// one group of a global aggregate).
    fn insert_group(&mut self, index_key: GroupKey, key: Option<GroupKey>) -> Result<usize> {
        let accumulators = self
            .aggregates
            .iter()
            .map(|a| match (a.function, &a.output_type) {
                (AggregateFunction::DataFusion, _) => {
                    let aggregate = a
                        .datafusion
                        .as_ref()
                        .ok_or_else(|| Error::Internal("a DataFusion aggregate without its expression".into()))?;
                    Ok(Accumulator::DataFusion(aggregate.create_accumulator()?))
                }
                (AggregateFunction::CountRows | AggregateFunction::Count, _) => Ok(Accumulator::Count(0)),
                (AggregateFunction::Sum, DataType::Int64) => {
                    Ok(Accumulator::SumInt { sum: Wide::default(), values: 0 })
                }
                (AggregateFunction::Sum | AggregateFunction::Avg, _) => {
                    Ok(Accumulator::SumFloat { sum: 0.0, values: 0 })
                }
                (AggregateFunction::Min | AggregateFunction::Max, _) if a.append_only => {
                    Ok(Accumulator::Best { value: None, max: a.function == AggregateFunction::Max })
                }
                (AggregateFunction::Min | AggregateFunction::Max, _) => Ok(Accumulator::Extreme(BTreeMap::new())),
                (AggregateFunction::BoolAnd | AggregateFunction::BoolOr, _) => {
                    Ok(Accumulator::Bools { trues: 0, falses: 0 })
                }
                (AggregateFunction::Variance { .. }, _) => {
                    Ok(Accumulator::Moments(Box::new(Moments { exact: Some((0, 0)), ..Moments::default() })))
                }
                (AggregateFunction::CountDistinct, _) if a.distinct_ints() => {
                    Ok(Accumulator::DistinctInts(Box::default()))
                }
                (AggregateFunction::CountDistinct, _) => Ok(Accumulator::Distinct(Box::default())),
                (AggregateFunction::StringAgg | AggregateFunction::ArrayAgg, _) => {
                    Ok(Accumulator::Values(Box::default()))
                }
            })
            .collect::<Result<Vec<_>>>()?;
        let bytes = group_bytes(index_key.len(), self.aggregates.len());
        let group =
            Group { key, weight: 0, accumulators, emitted: None, dirty: true, bytes, used: self.clock, synced: false };
        let id = self.place(group);
        self.index.insert(index_key, id);
        self.dirty.push(id);
        Ok(id)
    }

    fn evaluate_arguments(&self, batch: &RecordBatch) -> Result<Vec<Argument>> {
        self.aggregates
            .iter()
            .zip(&self.value_converters)
            .map(|(spec, converter)| {
                if let Some(aggregate) = &spec.datafusion {
                    let columns = aggregate
                        .expressions()
                        .iter()
                        .map(|e| e.evaluate(batch).and_then(|v| v.into_array(batch.num_rows())))
                        .collect::<datafusion::error::Result<Vec<_>>>()?;
                    return Ok(Argument::Columns(columns));
                }
                let Some(expr) = &spec.argument else { return Ok(Argument::None) };
                let values = expr.evaluate(batch)?.into_array(batch.num_rows())?;
                Ok(match (spec.function, converter) {
                    (_, Some(converter)) => {
                        let target = spec.value_type().unwrap_or_else(|| values.data_type().clone());
                        let values = if *values.data_type() == target { values } else { cast(&values, &target)? };
                        Argument::Rows(converter.convert_columns(std::slice::from_ref(&values))?, values)
                    }
                    (AggregateFunction::Variance { .. }, _) if values.data_type().is_integer() => {
                        let ints = cast(&values, &DataType::Int64)?;
                        Argument::Ints(downcast::<Int64Array>(&ints)?.clone())
                    }
                    (AggregateFunction::Count, _) => Argument::Any(values),
                    (AggregateFunction::CountDistinct, None) => {
                        let ints = cast(&values, &DataType::Int64)?;
                        Argument::Ints(downcast::<Int64Array>(&ints)?.clone())
                    }
                    (AggregateFunction::BoolAnd | AggregateFunction::BoolOr, _) => {
                        let bools = cast(&values, &DataType::Boolean)?;
                        Argument::Bools(downcast::<BooleanArray>(&bools)?.clone())
                    }
                    (_, None) if spec.output_type == DataType::Int64 => {
                        let ints = cast(&values, &DataType::Int64)?;
                        Argument::Ints(downcast::<Int64Array>(&ints)?.clone())
                    }
                    _ => {
                        let floats = cast(&values, &DataType::Float64)?;
                        Argument::Floats(downcast::<Float64Array>(&floats)?.clone())
                    }
                })
            })
            .collect()
    }

    /// Builds the current output row of each group in `ids` (groups with rows only).
    fn output_rows(&mut self, ids: &[usize]) -> Result<RecordBatch> {
        let parser = self.key_converter.parser();
        let keys: Vec<_> = ids.iter().filter_map(|&id| self.state[id].key.as_ref().map(|k| parser.parse(k))).collect();
        let mut columns: Vec<ArrayRef> =
            if self.groups.is_empty() { Vec::new() } else { self.key_converter.convert_rows(keys)? };
        for (a, (spec, converter)) in self.aggregates.iter().zip(&self.value_converters).enumerate() {
            if spec.function == AggregateFunction::DataFusion {
                let mut values = Vec::with_capacity(ids.len());
                for &id in ids {
                    let Accumulator::DataFusion(acc) = &mut self.state[id].accumulators[a] else {
                        return Err(Error::Internal("aggregate state does not match its function".into()));
                    };
                    values.push(acc.evaluate()?);
                }
                let column = if values.is_empty() {
                    datafusion::arrow::array::new_empty_array(&spec.output_type)
                } else {
                    cast(&datafusion::common::ScalarValue::iter_to_array(values)?, &spec.output_type)?
                };
                columns.push(column);
                continue;
            }
            let accumulators = ids.iter().map(|&id| &self.state[id].accumulators[a]);
            let column: ArrayRef = match spec.function {
                AggregateFunction::DataFusion => {
                    return Err(Error::Internal("a DataFusion aggregate reached the built-in path".into()));
                }
                AggregateFunction::CountRows | AggregateFunction::Count | AggregateFunction::CountDistinct => {
                    let mut b = Int64Builder::with_capacity(ids.len());
                    for acc in accumulators {
                        b.append_value(match acc {
                            Accumulator::Count(n) => *n,
                            Accumulator::Values(collected) => collected.values.len() as i64,
                            Accumulator::Distinct(values) => values.len() as i64,
                            Accumulator::DistinctInts(values) => values.len() as i64,
                            _ => 0,
                        });
                    }
                    Arc::new(b.finish())
                }
                AggregateFunction::Sum if spec.output_type == DataType::Int64 => {
                    let mut b = Int64Builder::with_capacity(ids.len());
                    for acc in accumulators {
                        match acc {
                            Accumulator::SumInt { values, .. } if *values == 0 => b.append_null(),
                            Accumulator::SumInt { sum, .. } => {
                                b.append_value(i64::try_from(sum.get()).map_err(|_| Error::InvalidValue {
                                    code: "22003",
                                    message: "sum is out of range for bigint".into(),
                                })?)
                            }
                            _ => b.append_null(),
                        }
                    }
                    Arc::new(b.finish())
                }
                AggregateFunction::Sum | AggregateFunction::Avg => {
                    let mut b = Float64Builder::with_capacity(ids.len());
                    for acc in accumulators {
                        match acc {
                            Accumulator::SumFloat { values, .. } if *values == 0 => b.append_null(),
                            Accumulator::SumFloat { sum, values } if spec.function == AggregateFunction::Avg => {
                                b.append_value(sum / *values as f64)
                            }
                            Accumulator::SumFloat { sum, .. } => b.append_value(*sum),
                            _ => b.append_null(),
                        }
                    }
                    Arc::new(b.finish())
                }
                AggregateFunction::BoolAnd | AggregateFunction::BoolOr => {
                    let mut b = BooleanBuilder::with_capacity(ids.len());
                    for acc in accumulators {
                        match acc {
                            Accumulator::Bools { trues, falses } if trues + falses > 0 => {
                                b.append_value(if spec.function == AggregateFunction::BoolAnd {
                                    *falses == 0
                                } else {
                                    *trues > 0
                                })
                            }
                            _ => b.append_null(),
                        }
                    }
                    Arc::new(b.finish())
                }
                AggregateFunction::Variance { population, root } => {
                    let mut b = Float64Builder::with_capacity(ids.len());
                    for acc in accumulators {
                        b.append_option(match acc {
                            Accumulator::Moments(m) => variance(m.n, m.sum, m.squares, m.exact, population, root),
                            _ => None,
                        });
                    }
                    Arc::new(b.finish())
                }
                AggregateFunction::StringAgg | AggregateFunction::ArrayAgg => {
                    let converter = converter
                        .as_ref()
                        .ok_or_else(|| Error::Internal("collected values without converter".into()))?;
                    collected_column(spec, converter, accumulators)?
                }
                AggregateFunction::Min | AggregateFunction::Max => {
                    let converter =
                        converter.as_ref().ok_or_else(|| Error::Internal("min/max without converter".into()))?;
                    let mut present = Vec::with_capacity(ids.len());
                    let mut picked: Vec<&[u8]> = Vec::new();
                    for acc in accumulators {
                        let value = match acc {
                            Accumulator::Extreme(values) if spec.function == AggregateFunction::Min => {
                                values.keys().next()
                            }
                            Accumulator::Extreme(values) => values.keys().next_back(),
                            Accumulator::Best { value, .. } => value.as_ref(),
                            _ => None,
                        };
                        present.push(value.is_some());
                        if let Some(v) = value {
                            picked.push(v);
                        }
                    }
                    min_max_column(converter, &picked, &present, &spec.output_type)?
                }
            };
            columns.push(column);
        }
        let columns = columns
            .into_iter()
            .zip(self.schema.fields())
            .map(|(c, f)| if c.data_type() == f.data_type() { Ok(c) } else { cast(&c, f.data_type()) })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(RecordBatch::try_new_with_options(
            self.schema.clone(),
            columns,
            &RecordBatchOptions::new().with_row_count(Some(ids.len())),
        )?)
    }
}

/// Sample or population variance (or standard deviation) from the moments; NULL where
/// SQL says so (no values, or one value for the sample forms).
fn variance(n: i64, sum: f64, squares: f64, exact: Option<(i128, i128)>, population: bool, root: bool) -> Option<f64> {
    let divisor = if population { n } else { n - 1 };
    if n <= 0 || divisor <= 0 {
        return None;
    }
    // n·Σx² − (Σx)², exact for integers while it fits.
    let spread = exact
        .and_then(|(s, q)| (n as i128).checked_mul(q)?.checked_sub(s.checked_mul(s)?))
        .map(|d| d as f64)
        .unwrap_or(n as f64 * squares - sum * sum)
        .max(0.0);
    let value = spread / (n as f64 * divisor as f64);
    Some(if root { value.sqrt() } else { value })
}

/// `string_agg` / `array_agg` output: each group's values in encoded order.
fn collected_column<'a>(
    spec: &AggregateSpec,
    converter: &RowConverter,
    accumulators: impl Iterator<Item = &'a Accumulator>,
) -> Result<ArrayRef> {
    let parser = converter.parser();
    let mut encoded = Vec::new();
    let mut lengths = Vec::new();
    for acc in accumulators {
        let Accumulator::Values(collected) = acc else {
            return Err(Error::Internal("collected values without their state".into()));
        };
        let Collected { values, nulls: null_values } = collected.as_ref();
        let mut length = 0;
        for (value, count) in values {
            for _ in 0..*count {
                encoded.push(parser.parse(value));
                length += 1;
            }
        }
        lengths.push((length, *null_values));
    }
    let values = if encoded.is_empty() {
        new_null_array(&DataType::Utf8, 0)
    } else {
        converter.convert_rows(encoded)?.remove(0)
    };
    match spec.function {
        AggregateFunction::StringAgg => {
            let strings = cast(&values, &DataType::Utf8)?;
            let strings = downcast::<StringArray>(&strings)?;
            let mut b = StringBuilder::new();
            let mut next = 0;
            for (length, _) in lengths {
                if length == 0 {
                    b.append_null();
                    continue;
                }
                let parts: Vec<&str> = (next..next + length).map(|i| strings.value(i)).collect();
                b.append_value(parts.join(&spec.delimiter));
                next += length;
            }
            Ok(Arc::new(b.finish()))
        }
        _ => {
            let DataType::List(item) = &spec.output_type else {
                return Err(Error::Internal("array_agg without a list type".into()));
            };
            // NULL elements go before or after the values, as the ORDER BY asks.
            let mut indices: Vec<Option<u32>> = Vec::new();
            let mut offsets = vec![0i32];
            let mut validity = Vec::new();
            let mut next = 0u32;
            for (length, null_values) in lengths {
                let nulls = std::iter::repeat_n(None, usize::try_from(null_values).unwrap_or(0));
                if spec.nulls_first {
                    indices.extend(nulls.clone());
                }
                for _ in 0..length {
                    indices.push(Some(next));
                    next += 1;
                }
                if !spec.nulls_first {
                    indices.extend(nulls);
                }
                let total = length as i64 + null_values;
                validity.push(total > 0);
                let last = *offsets.last().unwrap_or(&0);
                offsets
                    .push(last + i32::try_from(total).map_err(|_| Error::Internal("array_agg over 2G values".into()))?);
            }
            let values = if values.data_type() == item.data_type() { values } else { cast(&values, item.data_type())? };
            let elements = take(values.as_ref(), &UInt32Array::from(indices), None)?;
            let list = ListArray::try_new(
                item.clone(),
                OffsetBuffer::new(offsets.into()),
                elements,
                Some(NullBuffer::from(validity)),
            )?;
            Ok(Arc::new(list))
        }
    }
}

fn downcast<T: 'static>(array: &ArrayRef) -> Result<&T> {
    array.as_any().downcast_ref::<T>().ok_or_else(|| Error::Internal("unexpected array type".into()))
}

/// Decodes the chosen min/max values, with NULL where a group has no values.
fn min_max_column(
    converter: &RowConverter,
    picked: &[&[u8]],
    present: &[bool],
    data_type: &DataType,
) -> Result<ArrayRef> {
    let parser = converter.parser();
    let rows: Vec<_> = picked.iter().map(|bytes| parser.parse(bytes)).collect();
    let values = if rows.is_empty() { new_null_array(data_type, 0) } else { converter.convert_rows(rows)?.remove(0) };
    if present.iter().all(|p| *p) {
        return Ok(values);
    }
    // Spread the decoded values over the groups, NULL where a group has none.
    let mut indices = Vec::with_capacity(present.len());
    let mut next = 0u32;
    for p in present {
        indices.push(p.then(|| {
            next += 1;
            next - 1
        }));
    }
    let indices = datafusion::arrow::array::UInt32Array::from(indices);
    Ok(datafusion::arrow::compute::take(values.as_ref(), &indices, None)?)
}

#[async_trait]
impl Operator for AggregateOperator {
    fn name(&self) -> &str {
        "aggregate"
    }

    async fn process(&mut self, _port: usize, input: ChangeBatch, _out: &mut Output) -> Result<()> {
        let batch = input.batch();
        let weights = input.weights();
        let keys = self
            .groups
            .iter()
            .map(|e| e.evaluate(batch).and_then(|v| v.into_array(batch.num_rows())))
            .collect::<datafusion::error::Result<Vec<_>>>()?;
        let key_rows = if self.groups.is_empty() { None } else { Some(self.key_converter.convert_columns(&keys)?) };
        let key_times = match &self.event_time {
            Some(event_time) => Some(event_times(&keys[event_time.group])?),
            None => None,
        };
        let arguments = self.evaluate_arguments(batch)?;
        // Rows for DataFusion aggregates, per group: (row, weight), fed after the loop.
        let mut fed: FastMap<usize, Vec<(u32, i64)>> = FastMap::default();
        let feeds = arguments.iter().any(|a| matches!(a, Argument::Columns(_)));
        for i in 0..batch.num_rows() {
            let w = weights.value(i);
            let id = match &key_rows {
                None => 0,
                Some(rows) => {
                    let row = rows.row(i);
                    match self.index.get(row.as_ref()) {
                        Some(&id) => id,
                        None => match self.spilled(row.as_ref())? {
                            Some(value) => {
                                let id = self.load_group(row.as_ref(), &value)?;
                                self.dirty.push(id);
                                self.state[id].dirty = true;
                                id
                            }
                            None => {
                                let key = GroupKey::from(row.as_ref());
                                if let (Some(times), Some(event_time)) = (&key_times, &mut self.event_time)
                                    && times.is_valid(i)
                                {
                                    event_time.groups_by_time.entry(times.value(i)).or_default().push(key.clone());
                                }
                                self.insert_group(key.clone(), Some(key))?
                            }
                        },
                    }
                }
            };
            let group = &mut self.state[id];
            group.weight += w;
            group.used = self.clock;
            group.synced = false;
            if !group.dirty {
                group.dirty = true;
                self.dirty.push(id);
            }
            let mut grown = 0isize;
            if feeds {
                fed.entry(id).or_default().push((i as u32, w));
            }
            for (acc, argument) in group.accumulators.iter_mut().zip(&arguments) {
                match (acc, argument) {
                    (Accumulator::Count(n), Argument::None) => *n += w,
                    (Accumulator::Count(n), Argument::Any(values)) => {
                        if values.is_valid(i) {
                            *n += w
                        }
                    }
                    (Accumulator::SumInt { sum, values }, Argument::Ints(ints)) => {
                        if ints.is_valid(i) {
                            *sum = Wide::new(sum.get() + ints.value(i) as i128 * w as i128);
                            *values += w;
                        }
                    }
                    (Accumulator::SumFloat { sum, values }, Argument::Floats(floats)) => {
                        if floats.is_valid(i) {
                            *sum += floats.value(i) * w as f64;
                            *values += w;
                        }
                    }
                    (Accumulator::Bools { trues, falses }, Argument::Bools(bools)) => {
                        if bools.is_valid(i) {
                            if bools.value(i) { *trues += w } else { *falses += w }
                        }
                    }
                    (Accumulator::Moments(moments), Argument::Ints(ints)) => {
                        let Moments { n, sum, squares, exact } = moments.as_mut();
                        if ints.is_valid(i) {
                            let (x, w) = (ints.value(i) as i128, w as i128);
                            *n += w as i64;
                            *exact = exact.and_then(|(s, q)| {
                                Some((
                                    s.checked_add(x.checked_mul(w)?)?,
                                    q.checked_add(x.checked_mul(x)?.checked_mul(w)?)?,
                                ))
                            });
                            *sum += (x * w) as f64;
                            *squares += (x * x) as f64 * w as f64;
                        }
                    }
                    (Accumulator::Moments(moments), Argument::Floats(floats)) => {
                        let Moments { n, sum, squares, exact } = moments.as_mut();
                        if floats.is_valid(i) {
                            *exact = None;
                            let x = floats.value(i);
                            *n += w;
                            *sum += x * w as f64;
                            *squares += x * x * w as f64;
                        }
                    }
                    (Accumulator::Values(collected), Argument::Rows(rows, values)) => {
                        if values.is_valid(i) {
                            let value = rows.row(i);
                            grown += count_value(&mut collected.values, value.as_ref(), w, value_bytes(value.as_ref()));
                        } else {
                            collected.nulls += w;
                        }
                    }
                    (Accumulator::DistinctInts(set), Argument::Ints(ints)) => {
                        // NULLs are not counted.
                        if ints.is_valid(i) {
                            grown += count_value(set.as_mut(), &ints.value(i), w, INT_VALUE_BYTES);
                        }
                    }
                    (Accumulator::Distinct(set), Argument::Rows(rows, values)) => {
                        if values.is_valid(i) {
                            let value = rows.row(i);
                            grown += count_value(set.as_mut(), value.as_ref(), w, value_bytes(value.as_ref()));
                        }
                    }
                    (Accumulator::Extreme(set), Argument::Rows(rows, values)) => {
                        // NULLs never win min/max.
                        if values.is_valid(i) {
                            let value = rows.row(i);
                            grown += count_value(set, value.as_ref(), w, value_bytes(value.as_ref()));
                        }
                    }
                    (Accumulator::Best { value, max }, Argument::Rows(rows, values)) => {
                        if w < 0 {
                            return Err(Error::Internal(
                                "a row was taken back from min/max over an input planned as append-only".into(),
                            ));
                        }
                        // NULLs never win min/max.
                        if values.is_valid(i) {
                            let candidate = rows.row(i);
                            let candidate = candidate.as_ref();
                            let better = match value.as_deref() {
                                None => true,
                                Some(best) if *max => candidate > best,
                                Some(best) => candidate < best,
                            };
                            if better {
                                grown +=
                                    value_bytes(candidate) as isize - value.as_deref().map_or(0, value_bytes) as isize;
                                *value = Some(Box::from(candidate));
                            }
                        }
                    }
                    (Accumulator::DataFusion(_), Argument::Columns(_)) => {}
                    _ => return Err(Error::Internal("aggregate state does not match its argument".into())),
                }
            }
            if grown != 0 {
                group.bytes = group.bytes.saturating_add_signed(grown);
                self.memory = self.memory.saturating_add_signed(grown);
            }
        }
        for (id, rows) in fed {
            // A row of weight w goes in w times; negative weights are taken back.
            let mut added = Vec::new();
            let mut removed = Vec::new();
            for (row, w) in rows {
                let list = if w > 0 { &mut added } else { &mut removed };
                list.extend(std::iter::repeat_n(row, w.unsigned_abs() as usize));
            }
            for (acc, argument) in self.state[id].accumulators.iter_mut().zip(&arguments) {
                let (Accumulator::DataFusion(acc), Argument::Columns(columns)) = (acc, argument) else { continue };
                let take_rows = |rows: &[u32]| -> Result<Vec<ArrayRef>> {
                    let indices = UInt32Array::from(rows.to_vec());
                    Ok(columns.iter().map(|c| take(c, &indices, None)).collect::<std::result::Result<Vec<_>, _>>()?)
                };
                if !added.is_empty() {
                    acc.update_batch(&take_rows(&added)?)?;
                }
                if !removed.is_empty() {
                    if !acc.supports_retract_batch() {
                        return Err(Error::Internal(
                            "an aggregate that cannot take rows back was given a retraction".into(),
                        ));
                    }
                    acc.retract_batch(&take_rows(&removed)?)?;
                }
            }
        }
        Ok(())
    }

    /// Every live group: its key, weight, accumulators and emitted row; with event time,
    /// the open groups by time and watermarks not yet applied. DataFusion's own
    /// accumulators cannot be written: such an operator cannot be checkpointed (`None`).
    ///
    /// Once groups have spilled, or the state is large, the groups go into the spill
    /// store instead, and the state lists its files: only files no earlier checkpoint
    /// uploaded are uploaded, so the bytes follow what changed.
    fn checkpoint(&mut self) -> Result<Option<Vec<u8>>> {
        let spilled = self.spill.as_ref().is_some_and(|s| s.store.is_some());
        let through_store = self.spill.is_some() && self.spillable() && (spilled || self.memory >= INCREMENTAL_FROM);
        let mut w = StateWriter::with_capacity(if through_store { 4096 } else { self.memory });
        w.u64(through_store as u64);
        if let Some(event_time) = &self.event_time {
            w.u64(event_time.groups_by_time.len() as u64);
            for (time, keys) in &event_time.groups_by_time {
                w.i64(*time);
                w.u64(keys.len() as u64);
                keys.iter().for_each(|k| w.bytes(k));
            }
            w.u64(event_time.pending.len() as u64);
            for (column, value) in &event_time.pending {
                w.u64(*column as u64);
                w.i64(*value);
            }
        }
        if through_store {
            self.store()?;
            let ids: Vec<usize> = self.index.values().copied().collect();
            self.sync(&ids, &[])?;
            let spill = self.spill.as_mut().ok_or_else(|| Error::Internal("spill store vanished".into()))?;
            spill.checkpoint_into(&mut w)?;
            return Ok(Some(w.finish()));
        }
        w.u64(self.index.len() as u64);
        for (bytes, &id) in &self.index {
            w.bytes(bytes);
            if !Self::write_group(&mut w, &self.state[id]) {
                return Ok(None);
            }
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
        let mut r = StateReader::new(state, "an aggregate");
        let through_store = r.u64()? != 0;
        if let Some(event_time) = &mut self.event_time {
            event_time.groups_by_time.clear();
            for _ in 0..r.len(16)? {
                let time = r.i64()?;
                let keys = (0..r.len(8)?).map(|_| Ok(GroupKey::from(r.bytes()?))).collect::<Result<Vec<_>>>()?;
                event_time.groups_by_time.insert(time, keys);
            }
            event_time.pending.clear();
            for _ in 0..r.len(16)? {
                let column = r.u64()? as usize;
                event_time.pending.insert(column, r.i64()?);
            }
        }
        self.index.clear();
        self.state.clear();
        self.free.clear();
        self.dirty.clear();
        self.memory = 0;
        if through_store {
            let spill = self
                .spill
                .as_mut()
                .ok_or_else(|| Error::Internal("restoring spilled state without a local directory".into()))?;
            spill.restore_from(&mut r)?;
            return r.finish();
        }
        let groups = r.len(33)?;
        for id in 0..groups {
            let bytes = r.bytes()?;
            let group = self.read_group(&mut r, bytes)?;
            let index_key = group.key.clone().unwrap_or_else(|| GroupKey::from(bytes));
            self.memory += group.bytes;
            self.state.push(group);
            self.index.insert(index_key, id);
        }
        r.finish()
    }

    async fn on_barrier(&mut self, _barrier: &Barrier, out: &mut Output) -> Result<()> {
        let dirty = std::mem::take(&mut self.dirty);
        let global = self.groups.is_empty();
        let mut deleted = Vec::new();
        let mut retracted = Vec::new();
        let mut current = Vec::new();
        for &id in &dirty {
            let group = &mut self.state[id];
            group.dirty = false;
            if let Some(old) = group.emitted.take() {
                retracted.push(old);
            }
            if group.weight < 0 {
                return Err(Error::Internal("a group's weight went negative: a retraction without its insert".into()));
            }
            if group.weight > 0 || global {
                current.push(id);
            } else {
                // Empty: its retraction is queued; forget the group.
                if let Some(key) = group.key.take() {
                    self.index.remove(key.as_ref());
                    deleted.push(key);
                }
                self.forget_group(id);
            }
        }
        let inserted = self.output_rows(&current)?;
        let new_rows = self.output_converter.convert_columns(inserted.columns())?;
        for (n, &id) in current.iter().enumerate() {
            self.state[id].emitted = Some(Box::from(new_rows.row(n).as_ref()));
        }
        let old = if retracted.is_empty() {
            RecordBatch::new_empty(self.schema.clone())
        } else {
            let parser = self.output_converter.parser();
            let columns = self.output_converter.convert_rows(retracted.iter().map(|r| parser.parse(r)))?;
            RecordBatch::try_new_with_options(
                self.schema.clone(),
                columns,
                &RecordBatchOptions::new().with_row_count(Some(retracted.len())),
            )?
        };
        out.push(ChangeBatch::replace(old, inserted)?.consolidate()?);
        // Watermarks go after the changes they close.
        if let Some(event_time) = &mut self.event_time {
            let pending = std::mem::take(&mut event_time.pending);
            if let Some(&watermark) = pending.get(&event_time.group) {
                deleted.extend(self.close_groups(watermark));
            }
            for (column, value) in pending {
                out.watermark(Watermark { column, value });
            }
        }
        self.clock += 1;
        let Some(spill) = &self.spill else { return Ok(()) };
        if let Some(store) = &spill.store {
            store.write(deleted.iter().map(|k| (k.as_ref(), None)))?;
        }
        if let Some(target) = spill.report(self.memory) {
            self.evict(target)?;
            if let Some(spill) = &self.spill {
                spill.report(self.memory);
            }
        }
        Ok(())
    }

    /// Watermarks of group columns wait for the barrier, so they follow the changes of
    /// the epoch; others stop here (aggregates have no watermark).
    async fn on_watermark(&mut self, _port: usize, watermark: Watermark, _out: &mut Output) -> Result<()> {
        if let Some(event_time) = &mut self.event_time {
            for derived in event_time.derivation.derive(watermark)? {
                let value = event_time.pending.entry(derived.column).or_insert(derived.value);
                *value = (*value).max(derived.value);
            }
        }
        Ok(())
    }
}

/// Adds `weight` to `value`'s count in `set`; returns the estimated bytes that added (a
/// new value, `bytes`) or freed (a value whose count reached zero).
fn count_value<S: ValueCounts>(set: &mut S, value: &S::Value, weight: i64, bytes: usize) -> isize {
    match set.count_mut(value) {
        Some(count) => {
            *count += weight;
            if *count == 0 {
                set.remove_value(value);
                return -(bytes as isize);
            }
            0
        }
        None => {
            set.insert_value(value, weight);
            bytes as isize
        }
    }
}

/// A map from values to how many rows hold them: encoded values ordered (min/max,
/// string_agg, array_agg) or hashed (count(DISTINCT)), or integers hashed (count(DISTINCT)).
trait ValueCounts {
    type Value: ?Sized;
    fn count_mut(&mut self, value: &Self::Value) -> Option<&mut i64>;
    fn remove_value(&mut self, value: &Self::Value);
    fn insert_value(&mut self, value: &Self::Value, count: i64);
}

/// Implements [`ValueCounts`] for a map type with the usual map methods, whose keys are
/// made from a `&value` by `owned`.
macro_rules! value_counts {
    ($map:ty, $value:ty, $owned:expr) => {
        impl ValueCounts for $map {
            type Value = $value;
            fn count_mut(&mut self, value: &$value) -> Option<&mut i64> {
                self.get_mut(value)
            }
            fn remove_value(&mut self, value: &$value) {
                self.remove(value);
            }
            fn insert_value(&mut self, value: &$value, count: i64) {
                self.insert($owned(value), count);
            }
        }
    };
}

value_counts!(BTreeMap<Box<[u8]>, i64>, [u8], Box::from);
value_counts!(FastMap<Box<[u8]>, i64>, [u8], Box::from);
value_counts!(FastMap<i64, i64>, i64, |value: &i64| *value);

/// An accumulator as the current version keeps it for `spec`. Checkpoints written before
/// count(DISTINCT) had hash maps of its own hold it as an ordered multiset of encoded values.
fn upgraded(spec: &AggregateSpec, acc: Accumulator) -> Result<Accumulator> {
    if spec.function != AggregateFunction::CountDistinct {
        return Ok(acc);
    }
    let Accumulator::Values(collected) = acc else { return Ok(acc) };
    let values = collected.values;
    let Some(argument_type) = spec.argument_type.clone().filter(|_| spec.distinct_ints()) else {
        return Ok(Accumulator::Distinct(Box::new(values.into_iter().collect())));
    };
    if values.is_empty() {
        return Ok(Accumulator::DistinctInts(Box::default()));
    }
    let converter = RowConverter::new(vec![SortField::new(argument_type)])?;
    let parser = converter.parser();
    let decoded = converter.convert_rows(values.keys().map(|k| parser.parse(k)))?.remove(0);
    let ints = cast(&decoded, &DataType::Int64)?;
    let ints = downcast::<Int64Array>(&ints)?;
    Ok(Accumulator::DistinctInts(Box::new(ints.values().iter().copied().zip(values.into_values()).collect())))
}

/// A group column's values as integers (event times in their unit).
fn event_times(column: &ArrayRef) -> Result<Int64Array> {
    let ints = cast(column, &DataType::Int64)?;
    downcast::<Int64Array>(&ints).cloned()
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::datatypes::{Field, Schema};
    use datafusion::physical_expr::expressions::Column;

    use super::*;
    use crate::dataflow::operators::testing::{feed, random_change};
    use crate::state::spill::MemoryPool;

    #[tokio::test]
    async fn emptied_groups_free_their_state() {
        let input = Arc::new(Schema::new(vec![Field::new("k", DataType::Int64, false)]));
        let output =
            Arc::new(Schema::new(vec![Field::new("k", DataType::Int64, true), Field::new("n", DataType::Int64, true)]));
        let key: Arc<dyn PhysicalExpr> = Arc::new(Column::new("k", 0));
        let count = AggregateSpec::new(AggregateFunction::CountRows, None, DataType::Int64);
        let mut operator =
            AggregateOperator::new(vec![key], vec![DataType::Int64], vec![count], output).expect("operator");
        let barrier = Barrier { epoch: 1, checkpoint: false, mutation: None };
        let mut out = Output::default();
        // Ten rounds of 100 new keys, each inserted and then deleted.
        for round in 0..10i64 {
            let keys = RecordBatch::try_new(
                input.clone(),
                vec![Arc::new(Int64Array::from((round * 100..round * 100 + 100).collect::<Vec<_>>()))],
            )
            .expect("keys");
            operator.process(0, ChangeBatch::inserts(keys.clone()), &mut out).await.expect("insert");
            operator.on_barrier(&barrier, &mut out).await.expect("barrier");
            operator.process(0, ChangeBatch::retracts(keys), &mut out).await.expect("delete");
            operator.on_barrier(&barrier, &mut out).await.expect("barrier");
        }
        assert!(operator.state.len() <= 100, "slots are reused: {} for 1000 keys seen", operator.state.len());
        assert!(operator.index.is_empty(), "no key of an emptied group stays indexed");
        // What was emitted nets out to nothing.
        let mut net = 0i64;
        for message in out.take_messages() {
            if let crate::dataflow::Message::Data(change) = message {
                net += change.weights().iter().flatten().sum::<i64>();
            }
        }
        assert_eq!(net, 0);
    }
    /// `k, count(*), min(v), count(DISTINCT v), sum(v), max(v) GROUP BY k`, with min and
    /// max kept as for an input that only gains rows if `append_only`.
    fn spilling_operator(append_only: bool) -> AggregateOperator {
        let output = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, true),
            Field::new("n", DataType::Int64, true),
            Field::new("low", DataType::Int64, true),
            Field::new("kinds", DataType::Int64, true),
            Field::new("total", DataType::Int64, true),
            Field::new("high", DataType::Int64, true),
        ]));
        let key: Arc<dyn PhysicalExpr> = Arc::new(Column::new("k", 0));
        let value: Arc<dyn PhysicalExpr> = Arc::new(Column::new("v", 1));
        let mut kinds = AggregateSpec::new(AggregateFunction::CountDistinct, Some(value.clone()), DataType::Int64);
        kinds.argument_type = Some(DataType::Int64);
        let mut aggregates = vec![
            AggregateSpec::new(AggregateFunction::CountRows, None, DataType::Int64),
            AggregateSpec::new(AggregateFunction::Min, Some(value.clone()), DataType::Int64),
            kinds,
            AggregateSpec::new(AggregateFunction::Sum, Some(value.clone()), DataType::Int64),
            AggregateSpec::new(AggregateFunction::Max, Some(value), DataType::Int64),
        ];
        aggregates.iter_mut().for_each(|a| a.append_only = append_only);
        AggregateOperator::new(vec![key], vec![DataType::Int64], aggregates, output).expect("operator")
    }

    fn checkpointed_and_restored(
        operator: AggregateOperator,
        dir: &std::path::Path,
        local: LocalState,
        append_only: bool,
    ) -> AggregateOperator {
        crate::dataflow::operators::testing::checkpointed_and_restored(
            operator,
            dir,
            local,
            spilling_operator(append_only),
        )
    }

    /// The oracle for spilling: an operator over a pool far too small for its groups, and
    /// one restored from its checkpoint's files midway, emit exactly what an operator
    /// that keeps everything in memory emits.
    #[tokio::test]
    async fn spilled_and_restored_groups_give_the_same_answer_as_groups_in_memory() {
        use rand::SeedableRng;
        let dir = tempfile::tempdir().expect("tempdir");
        let pool = MemoryPool::new(Some(64 << 10));
        let local =
            |name: &str, n: usize| LocalState { dir: dir.path().join(name), pool: pool.clone(), owner: (n as u64, 0) };
        let mut memory = spilling_operator(false);
        let mut spilling = spilling_operator(false);
        spilling.set_local_state(local("a", 1));
        let (mut expected, mut got) = (BTreeMap::new(), BTreeMap::new());
        let mut live: Vec<(i64, i64)> = Vec::new();
        let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
        for round in 0..30 {
            // Inserts over 3000 keys, and retractions of rows inserted before.
            let change = random_change(&mut rng, &mut live, (400, 3000, 50), 100);
            let barrier = Barrier { epoch: round, checkpoint: false, mutation: None };
            for (operator, into) in [(&mut memory, &mut expected), (&mut spilling, &mut got)] {
                feed(operator, 0, change.clone(), Some(&barrier), into).await;
            }
            assert_eq!(got, expected, "round {round}");
            if round == 15 {
                spilling = checkpointed_and_restored(spilling, dir.path(), local("b", 2), false);
            }
        }
        assert!(spilling.memory <= 64 << 10, "memory stays near the pool's limit: {}", spilling.memory);
        assert!(spilling.index.len() < 3000 / 2, "most groups are spilled: {} in memory", spilling.index.len());
        assert!(!expected.is_empty());
    }

    /// Over rows that are only ever inserted, min and max keeping one value answer as the
    /// general ones do, also spilled and restored from a checkpoint, in less memory; a
    /// retraction, which the plan said cannot come, is an error and not a wrong answer.
    #[tokio::test]
    async fn append_only_min_and_max_keep_one_value_and_answer_as_the_general_ones() {
        use rand::{Rng, SeedableRng};
        let dir = tempfile::tempdir().expect("tempdir");
        let input = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, false),
            Field::new("v", DataType::Int64, true),
        ]));
        let pool = MemoryPool::new(Some(16 << 10));
        let local = |name: &str| LocalState { dir: dir.path().join(name), pool: pool.clone(), owner: (1, 0) };
        let mut general = spilling_operator(false);
        let mut best = spilling_operator(true);
        let mut rng = rand::rngs::SmallRng::seed_from_u64(11);
        let (mut expected, mut got) = (BTreeMap::new(), BTreeMap::new());
        let batch_of = |rows: &[(i64, Option<i64>)]| {
            RecordBatch::try_new(
                input.clone(),
                vec![
                    Arc::new(Int64Array::from(rows.iter().map(|r| r.0).collect::<Vec<_>>())),
                    Arc::new(Int64Array::from(rows.iter().map(|r| r.1).collect::<Vec<_>>())),
                ],
            )
            .expect("batch")
        };
        for round in 0..20 {
            // Values of both signs and NULLs, over 500 keys; some keys see only NULLs.
            let rows: Vec<(i64, Option<i64>)> = (0..300)
                .map(|_| {
                    let k = rng.gen_range(0..500);
                    (k, (k % 50 != 0 && rng.gen_bool(0.9)).then(|| rng.gen_range(-1000..1000)))
                })
                .collect();
            let change = ChangeBatch::inserts(batch_of(&rows));
            let barrier = Barrier { epoch: round, checkpoint: false, mutation: None };
            for (operator, into) in [(&mut general, &mut expected), (&mut best, &mut got)] {
                feed(operator, 0, change.clone(), Some(&barrier), into).await;
            }
            assert_eq!(got, expected, "round {round}");
            if round == 5 {
                best.set_local_state(local("a"));
            }
            if round == 12 {
                best = checkpointed_and_restored(best, dir.path(), local("b"), true);
            }
        }
        assert!(expected.len() >= 450, "most keys have a group: {}", expected.len());
        let (mut general, mut in_memory) = (spilling_operator(false), spilling_operator(true));
        let mut out = Output::default();
        let rows: Vec<(i64, Option<i64>)> = (0..2000).map(|i| (i % 10, Some(i))).collect();
        for operator in [&mut general, &mut in_memory] {
            operator.process(0, ChangeBatch::inserts(batch_of(&rows)), &mut out).await.expect("process");
        }
        // Both keep every value for count(DISTINCT v); the general min and max keep them
        // twice more.
        assert!(
            in_memory.memory * 2 < general.memory,
            "min and max keep one value per group instead of every value: {} against {} bytes",
            in_memory.memory,
            general.memory
        );
        let taken_back = in_memory.process(0, ChangeBatch::retracts(batch_of(&rows[..1])), &mut out).await;
        assert!(taken_back.is_err(), "a retraction into append-only min/max is refused");
    }

    /// A checkpoint written before count(DISTINCT) kept a hash map holds its values as an
    /// ordered multiset of encoded values; it is read into the map the operator now keeps,
    /// with the same values and counts.
    #[test]
    fn count_distinct_from_an_older_checkpoint_is_read_into_a_hash_map() {
        let operator = spilling_operator(false);
        let ints = RowConverter::new(vec![SortField::new(DataType::Int64)]).expect("converter");
        let rows = ints.convert_columns(&[Arc::new(Int64Array::from(vec![-5, 3, 70])) as ArrayRef]).expect("rows");
        let encoded = |i: usize| Box::<[u8]>::from(rows.row(i).as_ref());
        let mut w = StateWriter::with_capacity(256);
        w.u64(1);
        w.i64(4);
        w.u64(0);
        Accumulator::Count(4).write(&mut w);
        Accumulator::Extreme(BTreeMap::from([(encoded(0), 1), (encoded(1), 2), (encoded(2), 1)])).write(&mut w);
        let values = BTreeMap::from([(encoded(0), 1), (encoded(1), 2), (encoded(2), 1)]);
        Accumulator::Values(Box::new(Collected { values, nulls: 0 })).write(&mut w);
        Accumulator::SumInt { sum: Wide::new(71), values: 4 }.write(&mut w);
        Accumulator::Extreme(BTreeMap::from([(encoded(0), 1), (encoded(1), 2), (encoded(2), 1)])).write(&mut w);
        let bytes = w.finish();
        let mut r = StateReader::new(&bytes, "an old group");
        let group = operator.read_group(&mut r, b"key").expect("read");
        r.finish().expect("every byte read");
        let Accumulator::DistinctInts(values) = &group.accumulators[2] else {
            panic!("count(DISTINCT) over integers is read as integers: {:?}", group.accumulators[2]);
        };
        let mut values: Vec<(i64, i64)> = values.iter().map(|(v, n)| (*v, *n)).collect();
        values.sort();
        assert_eq!(values, vec![(-5, 1), (3, 2), (70, 1)]);
        assert!(matches!(group.accumulators[1], Accumulator::Extreme(_)), "min keeps its ordered values");

        let mut text =
            AggregateSpec::new(AggregateFunction::CountDistinct, Some(Arc::new(Column::new("s", 0))), DataType::Int64);
        text.argument_type = Some(DataType::Utf8);
        let old = Accumulator::Values(Box::new(Collected {
            values: BTreeMap::from([(encoded(0), 1), (encoded(2), 3)]),
            nulls: 0,
        }));
        let Accumulator::Distinct(values) = upgraded(&text, old).expect("upgraded") else {
            panic!("count(DISTINCT) over text is read into a map of encoded values");
        };
        assert_eq!(values.len(), 2);
        assert_eq!(values.get(rows.row(2).as_ref()), Some(&3));
    }
}
