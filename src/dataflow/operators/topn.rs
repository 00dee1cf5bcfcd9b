//! [`TopNOperator`]: `ORDER BY … LIMIT n [OFFSET m]`, and top-N per group:
//! `row_number() OVER (PARTITION BY … ORDER BY …) <= n`.
//!
//! Keeps every input row in an ordered multiset per partition (by the encoded sort key,
//! then the whole row, so ties are broken the same way every time) and, at each barrier,
//! emits for each changed partition the difference between the rows now in positions
//! `[offset, offset + limit)` and the rows it emitted before. With a row number, a row
//! whose rank moved is retracted with its old number and inserted with its new one. A
//! change costs O(log n); a barrier costs O(offset + limit) per changed partition.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::{Int64Array, RecordBatchOptions, UInt64Array};
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::arrow::row::{RowConverter, SortField};
use datafusion::physical_plan::PhysicalExpr;

use crate::dataflow::checkpoint::{StateReader, StateWriter};
use crate::dataflow::operator::{Barrier, Operator, Output};
use crate::dataflow::{ChangeBatch, FastMap, FastSet, Watermark};
use crate::error::{Error, Result};

/// Key of the ordered multiset: encoded sort key, then the encoded row.
type Entry = (Box<[u8]>, Box<[u8]>);

/// The rows of one partition (all rows when there is no PARTITION BY).
#[derive(Default)]
struct Group {
    ordered: BTreeMap<Entry, i64>,
    /// What was emitted: (encoded row, rank or 0) → multiplicity.
    emitted: HashMap<(Box<[u8]>, u64), i64>,
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
}

pub struct TopNOperator {
    spec: TopNSpec,
    /// `None` without PARTITION BY: every row is in one group.
    partition_converter: Option<RowConverter>,
    sort_converter: RowConverter,
    /// Encodes input rows.
    rows: RowConverter,
    schema: SchemaRef,
    groups: FastMap<Box<[u8]>, Group>,
    dirty: FastSet<Box<[u8]>>,
}

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
        })
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
    /// barrier).
    fn checkpoint(&mut self) -> Result<Option<Vec<u8>>> {
        let mut w = StateWriter::default();
        w.u64(self.groups.len() as u64);
        for (partition, group) in &self.groups {
            w.bytes(partition);
            w.u64(group.ordered.len() as u64);
            for ((sort, row), n) in &group.ordered {
                w.bytes(sort);
                w.bytes(row);
                w.i64(*n);
            }
            w.u64(group.emitted.len() as u64);
            for ((row, rank), n) in &group.emitted {
                w.bytes(row);
                w.u64(*rank);
                w.i64(*n);
            }
        }
        Ok(Some(w.finish()))
    }

    fn restore(&mut self, state: &[u8]) -> Result<()> {
        let mut r = StateReader::new(state, "a top-N");
        self.groups.clear();
        self.dirty.clear();
        for _ in 0..r.len(24)? {
            let partition = Box::from(r.bytes()?);
            let mut group = Group::default();
            for _ in 0..r.len(24)? {
                let (sort, row) = (Box::from(r.bytes()?), Box::from(r.bytes()?));
                group.ordered.insert((sort, row), r.i64()?);
            }
            for _ in 0..r.len(24)? {
                let (row, rank) = (Box::from(r.bytes()?), r.u64()?);
                group.emitted.insert((row, rank), r.i64()?);
            }
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
        for i in 0..batch.num_rows() {
            let group_key: Box<[u8]> = groups.as_ref().map(|g| g.row(i).as_ref().into()).unwrap_or_default();
            let group = self.groups.entry(group_key.clone()).or_default();
            let entry: Entry = (keys.row(i).as_ref().into(), rows.row(i).as_ref().into());
            let count = group.ordered.entry(entry.clone()).or_insert(0);
            *count += input.weights().value(i);
            if *count == 0 {
                group.ordered.remove(&entry);
            } else if *count < 0 {
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
            group.emitted = current;
            if group.ordered.is_empty() && group.emitted.is_empty() {
                self.groups.remove(&key);
            }
        }
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
