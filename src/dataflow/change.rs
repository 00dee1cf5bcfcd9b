//! [`ChangeBatch`]: Arrow rows with a weight each (+1 insert, −1 retract).
//!
//! An update is a retraction of the old row and an insertion of the new one. A batch is a
//! Z-set fragment: applying it to a collection adds each row `weight` times.

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, BooleanArray, Int64Array, RecordBatchOptions, UInt32Array};
use datafusion::arrow::compute::kernels::cmp::{gt, lt};
use datafusion::arrow::compute::take;
use datafusion::arrow::compute::{concat_batches, filter, filter_record_batch, prep_null_mask_filter};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::arrow::row::{RowConverter, SortField};

use crate::error::{Error, Result};

/// Name of the weight column when a change batch is flattened into one record batch.
pub const WEIGHT_COLUMN: &str = "__freshet_weight";

/// Batches of insertions up to this many rows share one array of +1 weights.
const SHARED_ONES: usize = 1 << 16;

/// `n` weights of +1: a slice of one shared array when `n` is small enough.
fn ones(n: usize) -> Int64Array {
    static ONES: std::sync::OnceLock<Int64Array> = std::sync::OnceLock::new();
    match n {
        0..=SHARED_ONES => ONES.get_or_init(|| Int64Array::from(vec![1; SHARED_ONES])).slice(0, n),
        _ => Int64Array::from(vec![1; n]),
    }
}

/// Rows and their weights; `weights.len() == batch.num_rows()` always holds.
#[derive(Debug, Clone)]
pub struct ChangeBatch {
    batch: RecordBatch,
    weights: Int64Array,
}

impl ChangeBatch {
    /// Pairs rows with weights; fails if the lengths differ or a weight is NULL.
    pub fn try_new(batch: RecordBatch, weights: Int64Array) -> Result<Self> {
        if weights.len() != batch.num_rows() || weights.null_count() > 0 {
            return Err(Error::Internal(format!(
                "change batch has {} rows but {} weights ({} null)",
                batch.num_rows(),
                weights.len(),
                weights.null_count()
            )));
        }
        Ok(ChangeBatch { batch, weights })
    }

    /// Every row inserted once.
    pub fn inserts(batch: RecordBatch) -> Self {
        let weights = ones(batch.num_rows());
        ChangeBatch { batch, weights }
    }

    /// Every row retracted once.
    pub fn retracts(batch: RecordBatch) -> Self {
        let weights = Int64Array::from(vec![-1; batch.num_rows()]);
        ChangeBatch { batch, weights }
    }

    /// The same rows with every weight negated: what undoes this change.
    pub fn negated(&self) -> Self {
        let weights = Int64Array::from_iter_values(self.weights.values().iter().map(|w| -w));
        ChangeBatch { batch: self.batch.clone(), weights }
    }

    /// Retract `old`, insert `new` (both with the same schema).
    pub fn replace(old: RecordBatch, new: RecordBatch) -> Result<Self> {
        let schema = new.schema();
        let weights: Vec<i64> =
            std::iter::repeat_n(-1, old.num_rows()).chain(std::iter::repeat_n(1, new.num_rows())).collect();
        let old = RecordBatch::try_new(schema.clone(), old.columns().to_vec())?;
        let batch = concat_batches(&schema, [&old, &new])?;
        ChangeBatch::try_new(batch, Int64Array::from(weights))
    }

    /// Rows given as `columns` of `schema`, with their weights (also right for a schema
    /// without columns).
    pub fn from_columns(schema: SchemaRef, columns: Vec<ArrayRef>, weights: Vec<i64>) -> Result<Self> {
        let options = RecordBatchOptions::new().with_row_count(Some(weights.len()));
        let batch = RecordBatch::try_new_with_options(schema, columns, &options)?;
        ChangeBatch::try_new(batch, Int64Array::from(weights))
    }

    pub fn batch(&self) -> &RecordBatch {
        &self.batch
    }

    pub fn weights(&self) -> &Int64Array {
        &self.weights
    }

    pub fn num_rows(&self) -> usize {
        self.batch.num_rows()
    }

    /// Keeps the rows where `mask` is true (NULL counts as false), with their weights.
    pub fn filter(&self, mask: &BooleanArray) -> Result<Self> {
        let mask = if mask.null_count() > 0 { prep_null_mask_filter(mask) } else { mask.clone() };
        let weights = filter(&self.weights, &mask)?;
        let weights = weights
            .as_any()
            .downcast_ref::<Int64Array>()
            .ok_or_else(|| Error::Internal("filtered weights are not Int64".into()))?
            .clone();
        ChangeBatch::try_new(filter_record_batch(&self.batch, &mask)?, weights)
    }

    /// Whether any row is taken back (a negative weight).
    pub fn has_retractions(&self) -> bool {
        self.weights.values().iter().any(|&w| w < 0)
    }

    /// The rows with positive weight and the rows with negative weight, as plain batches.
    /// Each row appears `|weight|` times in its side.
    pub fn split(&self) -> Result<(RecordBatch, RecordBatch)> {
        // Insertions only: the rows as they are (without a branch per row, so it vectorises).
        if self.weights.values().iter().fold(true, |all, &w| all & (w == 1)) {
            return Ok((self.batch.clone(), self.batch.slice(0, 0)));
        }
        if self.weights.values().iter().all(|w| w.abs() == 1) {
            let zero = Int64Array::new_scalar(0);
            let positive = gt(&self.weights, &zero)?;
            let negative = lt(&self.weights, &zero)?;
            return Ok((filter_record_batch(&self.batch, &positive)?, filter_record_batch(&self.batch, &negative)?));
        }
        let mut ins = Vec::new();
        let mut del = Vec::new();
        for (row, w) in self.weights.values().iter().enumerate() {
            let side = if *w > 0 { &mut ins } else { &mut del };
            side.extend(std::iter::repeat_n(row as u32, w.unsigned_abs() as usize));
        }
        let take = |rows: Vec<u32>| -> Result<RecordBatch> {
            let indices = datafusion::arrow::array::UInt32Array::from(rows);
            let columns = self
                .batch
                .columns()
                .iter()
                .map(|c| datafusion::arrow::compute::take(c.as_ref(), &indices, None))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            Ok(RecordBatch::try_new(self.batch.schema(), columns)?)
        };
        Ok((take(ins)?, take(del)?))
    }

    /// Cancels equal rows against each other: every distinct row appears once, with the
    /// sum of its weights, and rows whose weights sum to zero disappear.
    pub fn consolidate(&self) -> Result<Self> {
        if self.num_rows() == 0 {
            return Ok(self.clone());
        }
        let fields = self.batch.schema().fields().iter().map(|f| SortField::new(f.data_type().clone())).collect();
        let converter = RowConverter::new(fields)?;
        let rows = converter.convert_columns(self.batch.columns())?;
        let mut slots: super::FastMap<&[u8], usize> =
            super::FastMap::with_capacity_and_hasher(rows.num_rows(), Default::default());
        let mut firsts: Vec<u32> = Vec::new();
        let mut sums: Vec<i64> = Vec::new();
        for (i, row) in rows.iter().enumerate() {
            let w = self.weights.value(i);
            match slots.get(row.as_ref()) {
                Some(&slot) => sums[slot] += w,
                None => {
                    slots.insert(row.data(), firsts.len());
                    firsts.push(i as u32);
                    sums.push(w);
                }
            }
        }
        let (keep, weights): (Vec<u32>, Vec<i64>) = firsts.into_iter().zip(sums).filter(|(_, w)| *w != 0).unzip();
        let indices = UInt32Array::from(keep);
        let columns = self
            .batch
            .columns()
            .iter()
            .map(|c| take(c.as_ref(), &indices, None))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let batch = RecordBatch::try_new_with_options(
            self.batch.schema(),
            columns,
            &RecordBatchOptions::new().with_row_count(Some(indices.len())),
        )?;
        ChangeBatch::try_new(batch, Int64Array::from(weights))
    }

    /// The changes one after another, as one batch of rows with columns `schema`.
    pub fn concat(schema: &SchemaRef, changes: &[ChangeBatch]) -> Result<Self> {
        let batches: Vec<_> = changes.iter().map(|c| c.batch.clone()).collect();
        let weights: Vec<i64> = changes.iter().flat_map(|c| c.weights.values().iter().copied()).collect();
        ChangeBatch::try_new(concat_batches(schema, &batches)?, Int64Array::from(weights))
    }

    /// Flattens into one record batch with a trailing [`WEIGHT_COLUMN`], for storage.
    pub fn to_flat(&self) -> Result<RecordBatch> {
        let mut fields: Vec<Arc<Field>> = self.batch.schema().fields().iter().cloned().collect();
        fields.push(Arc::new(Field::new(WEIGHT_COLUMN, DataType::Int64, false)));
        let mut columns = self.batch.columns().to_vec();
        columns.push(Arc::new(self.weights.clone()));
        Ok(RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)?)
    }

    /// Inverse of [`ChangeBatch::to_flat`]; `schema` is the schema of the rows.
    pub fn from_flat(flat: &RecordBatch, schema: SchemaRef) -> Result<Self> {
        let n = flat.num_columns();
        let weights = flat
            .column(n.checked_sub(1).ok_or_else(|| Error::Internal("flat change batch has no columns".into()))?)
            .as_any()
            .downcast_ref::<Int64Array>()
            .ok_or_else(|| Error::Internal("flat change batch has no weight column".into()))?
            .clone();
        let batch = RecordBatch::try_new(schema, flat.columns()[..n - 1].to_vec())?;
        ChangeBatch::try_new(batch, weights)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::Int32Array;

    fn ints(values: &[i32]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int32, false)]));
        RecordBatch::try_new(schema, vec![Arc::new(Int32Array::from(values.to_vec()))]).expect("one column")
    }

    fn column(batch: &RecordBatch) -> Vec<i32> {
        batch.column(0).as_any().downcast_ref::<Int32Array>().expect("ints").values().to_vec()
    }

    #[test]
    fn split_separates_inserts_from_retractions() {
        // + 1, - 2, + 3 (twice)
        let change = ChangeBatch::try_new(ints(&[1, 2, 3]), Int64Array::from(vec![1, -1, 2])).expect("lengths match");
        let (ins, del) = change.split().expect("splits");
        assert_eq!(column(&ins), vec![1, 3, 3]);
        assert_eq!(column(&del), vec![2]);
    }

    #[test]
    fn flat_form_round_trips() {
        let change = ChangeBatch::replace(ints(&[5]), ints(&[6])).expect("same schema");
        let flat = change.to_flat().expect("flattens");
        assert_eq!(flat.num_columns(), 2);
        let back = ChangeBatch::from_flat(&flat, ints(&[]).schema()).expect("unflattens");
        assert_eq!(column(back.batch()), vec![5, 6]);
        assert_eq!(back.weights().values().to_vec(), vec![-1, 1]);
    }

    #[test]
    fn consolidate_cancels_opposite_weights() {
        // + 1, + 2, - 1, + 2, - 3
        let change = ChangeBatch::try_new(ints(&[1, 2, 1, 2, 3]), Int64Array::from(vec![1, 1, -1, 1, -1]))
            .expect("lengths match");
        let net = change.consolidate().expect("consolidates");
        assert_eq!(column(net.batch()), vec![2, 3]);
        assert_eq!(net.weights().values().to_vec(), vec![2, -1]);
    }

    #[test]
    fn mismatched_weights_are_rejected() {
        assert!(ChangeBatch::try_new(ints(&[1, 2]), Int64Array::from(vec![1])).is_err());
    }
}
