//! [`TopNOperator`]: `ORDER BY … LIMIT n [OFFSET m]`.
//!
//! Keeps every input row in an ordered multiset (by the encoded sort key, then the whole
//! row, so ties are broken the same way every time) and, at each barrier, emits the
//! difference between the rows now in positions `[offset, offset + limit)` and the rows it
//! emitted before. A change costs O(log n); a barrier costs O(offset + limit).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::{Int64Array, RecordBatchOptions};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::arrow::row::{RowConverter, SortField};
use datafusion::physical_plan::PhysicalExpr;

use crate::dataflow::ChangeBatch;
use crate::dataflow::operator::{Barrier, Operator, Output};
use crate::error::{Error, Result};

/// Key of the ordered multiset: encoded sort key, then the encoded row.
type Entry = (Box<[u8]>, Box<[u8]>);

pub struct TopNOperator {
    sort: Vec<Arc<dyn PhysicalExpr>>,
    sort_converter: RowConverter,
    rows: RowConverter,
    offset: usize,
    limit: usize,
    schema: SchemaRef,
    ordered: BTreeMap<Entry, i64>,
    emitted: HashMap<Box<[u8]>, i64>,
    dirty: bool,
}

impl TopNOperator {
    /// `sort_fields` carry each sort expression's type and direction.
    pub fn new(
        sort: Vec<Arc<dyn PhysicalExpr>>,
        sort_fields: Vec<SortField>,
        offset: usize,
        limit: usize,
        schema: SchemaRef,
    ) -> Result<Self> {
        let rows = RowConverter::new(schema.fields().iter().map(|f| SortField::new(f.data_type().clone())).collect())?;
        Ok(TopNOperator {
            sort,
            sort_converter: RowConverter::new(sort_fields)?,
            rows,
            offset,
            limit,
            schema,
            ordered: BTreeMap::new(),
            emitted: HashMap::new(),
            dirty: true,
        })
    }
}

#[async_trait]
impl Operator for TopNOperator {
    fn name(&self) -> &str {
        "top_n"
    }

    async fn process(&mut self, _port: usize, input: ChangeBatch, _out: &mut Output) -> Result<()> {
        let batch = input.batch();
        let keys = self
            .sort
            .iter()
            .map(|e| e.evaluate(batch).and_then(|v| v.into_array(batch.num_rows())))
            .collect::<datafusion::error::Result<Vec<_>>>()?;
        let keys = self.sort_converter.convert_columns(&keys)?;
        let rows = self.rows.convert_columns(batch.columns())?;
        for i in 0..batch.num_rows() {
            let entry: Entry = (keys.row(i).as_ref().into(), rows.row(i).as_ref().into());
            let count = self.ordered.entry(entry.clone()).or_insert(0);
            *count += input.weights().value(i);
            if *count == 0 {
                self.ordered.remove(&entry);
            } else if *count < 0 {
                return Err(Error::Internal("top-N saw a retraction of a row it does not hold".into()));
            }
        }
        self.dirty |= batch.num_rows() > 0;
        Ok(())
    }

    async fn on_barrier(&mut self, _barrier: &Barrier, out: &mut Output) -> Result<()> {
        if !self.dirty {
            return Ok(());
        }
        self.dirty = false;
        let mut current: HashMap<Box<[u8]>, i64> = HashMap::new();
        let (mut position, end) = (0usize, self.offset.saturating_add(self.limit));
        for ((_, row), count) in &self.ordered {
            if position >= end {
                break;
            }
            let first = position.max(self.offset);
            position = position.saturating_add(*count as usize);
            let last = position.min(end);
            if last > first {
                *current.entry(row.clone()).or_insert(0) += (last - first) as i64;
            }
        }
        let mut changes: Vec<(Box<[u8]>, i64)> = Vec::new();
        for (row, count) in &current {
            let before = self.emitted.get(row).copied().unwrap_or(0);
            if *count != before {
                changes.push((row.clone(), count - before));
            }
        }
        for (row, before) in &self.emitted {
            if !current.contains_key(row) {
                changes.push((row.clone(), -before));
            }
        }
        self.emitted = current;
        if changes.is_empty() {
            return Ok(());
        }
        let parser = self.rows.parser();
        let columns = self.rows.convert_rows(changes.iter().map(|(row, _)| parser.parse(row)))?;
        let options = RecordBatchOptions::new().with_row_count(Some(changes.len()));
        let batch = RecordBatch::try_new_with_options(self.schema.clone(), columns, &options)?;
        let weights = Int64Array::from(changes.iter().map(|(_, w)| *w).collect::<Vec<_>>());
        out.push(ChangeBatch::try_new(batch, weights)?);
        Ok(())
    }
}
