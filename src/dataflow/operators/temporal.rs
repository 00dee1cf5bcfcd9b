//! [`TemporalFilterOperator`]: `WHERE ts > now() - window` in a view. A row is in the view
//! while its time is within `window` of the clock; the operator keeps the rows it let
//! through, ordered by when they expire, and at each barrier reads the clock and retracts
//! those that aged out. Rows that arrive already expired are never shown. The clock is
//! read only at barriers, so every change within an epoch is judged against one instant.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::{Array, Int64Array};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::arrow::row::{OwnedRow, RowConverter, SortField};

use crate::dataflow::checkpoint::{StateReader, StateWriter, read_rows_by_time, write_rows_by_time};
use crate::dataflow::operator::{Barrier, Operator, Output};
use crate::dataflow::{ChangeBatch, FastMap, Watermark};
use crate::error::{Error, Result};

/// Keeps rows whose `column` (a timestamp) is later than the clock minus `window_us`.
pub struct TemporalFilterOperator {
    column: usize,
    /// Microseconds per unit of the column.
    scale: f64,
    window_us: i64,
    schema: SchemaRef,
    converter: RowConverter,
    /// Expiry (µs since the epoch) → rows shown, with their multiplicities.
    shown: BTreeMap<i64, FastMap<OwnedRow, i64>>,
    /// The clock at the last barrier, in µs since the epoch.
    now: i64,
    clock: Arc<dyn Fn() -> i64 + Send + Sync>,
}

impl TemporalFilterOperator {
    /// `scale` is microseconds per unit of `column`.
    pub fn new(column: usize, scale: f64, window_ms: i64, schema: SchemaRef) -> Result<Self> {
        let clock: Arc<dyn Fn() -> i64 + Send + Sync> = Arc::new(|| chrono::Utc::now().timestamp_micros());
        Self::with_clock(column, scale, window_ms, schema, clock)
    }

    /// The same with a given clock (µs since the epoch), for tests.
    pub fn with_clock(
        column: usize,
        scale: f64,
        window_ms: i64,
        schema: SchemaRef,
        clock: Arc<dyn Fn() -> i64 + Send + Sync>,
    ) -> Result<Self> {
        let fields = schema.fields().iter().map(|f| SortField::new(f.data_type().clone())).collect();
        let converter = RowConverter::new(fields)?;
        let now = clock();
        Ok(TemporalFilterOperator {
            column,
            scale,
            window_us: window_ms.saturating_mul(1_000),
            schema,
            converter,
            shown: BTreeMap::new(),
            now,
            clock,
        })
    }

    fn emit(&self, rows: Vec<(OwnedRow, i64)>, out: &mut Output) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let columns = self.converter.convert_rows(rows.iter().map(|(r, _)| r.row()))?;
        let weights = rows.iter().map(|(_, w)| *w).collect();
        out.push(ChangeBatch::from_columns(self.schema.clone(), columns, weights)?);
        Ok(())
    }
}

#[async_trait]
impl Operator for TemporalFilterOperator {
    fn name(&self) -> &str {
        "temporal_filter (rows retract as they age out)"
    }

    /// The rows shown, by expiry, and the clock of the last barrier. After a restart the
    /// first barrier retracts whatever expired while freshet was down.
    fn checkpoint(&mut self) -> Result<Option<Vec<u8>>> {
        let mut w = StateWriter::default();
        write_rows_by_time(&mut w, &self.shown);
        w.i64(self.now);
        Ok(Some(w.finish()))
    }

    fn restore(&mut self, state: &[u8]) -> Result<()> {
        let mut r = StateReader::new(state, "a temporal filter");
        self.shown = read_rows_by_time(&mut r, &self.converter)?;
        self.now = r.i64()?;
        r.finish()
    }

    async fn process(&mut self, _port: usize, input: ChangeBatch, out: &mut Output) -> Result<()> {
        let times = cast(input.batch().column(self.column), &DataType::Int64)?;
        let times = times
            .as_any()
            .downcast_ref::<Int64Array>()
            .ok_or_else(|| Error::Internal("times did not cast to integers".into()))?;
        let rows = self.converter.convert_columns(input.batch().columns())?;
        let mut passed = Vec::new();
        for i in 0..input.num_rows() {
            // NULL is never later than anything: the row is filtered out.
            if !times.is_valid(i) {
                continue;
            }
            let expiry = ((times.value(i) as f64) * self.scale) as i64 + self.window_us;
            if expiry <= self.now {
                continue;
            }
            let weight = input.weights().value(i);
            let row = rows.row(i).owned();
            let copies = self.shown.entry(expiry).or_default();
            let count = copies.entry(row.clone()).or_insert(0);
            *count += weight;
            if *count == 0 {
                copies.remove(&row);
                if copies.is_empty() {
                    self.shown.remove(&expiry);
                }
            }
            passed.push((row, weight));
        }
        self.emit(passed, out)
    }

    /// The filtered column may leave the view at any time: watermarks stop here.
    async fn on_watermark(&mut self, _port: usize, _watermark: Watermark, _out: &mut Output) -> Result<()> {
        Ok(())
    }

    async fn on_barrier(&mut self, _barrier: &Barrier, out: &mut Output) -> Result<()> {
        self.now = self.now.max((self.clock)());
        // Rows expiring at or before now leave the view.
        let live = self.shown.split_off(&(self.now + 1));
        let expired = std::mem::replace(&mut self.shown, live);
        let retractions = expired.into_values().flatten().map(|(row, count)| (row, -count)).collect();
        self.emit(retractions, out)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicI64, Ordering};

    use datafusion::arrow::array::TimestampMicrosecondArray;
    use datafusion::arrow::datatypes::{Field, Schema, TimeUnit};
    use datafusion::arrow::record_batch::RecordBatch;

    use super::*;

    #[tokio::test]
    async fn rows_retract_when_they_age_out_at_a_barrier() {
        let schema: SchemaRef =
            Arc::new(Schema::new(vec![Field::new("ts", DataType::Timestamp(TimeUnit::Microsecond, None), true)]));
        let now = Arc::new(AtomicI64::new(1_000_000_000));
        let clock = {
            let now = now.clone();
            Arc::new(move || now.load(Ordering::SeqCst))
        };
        // Rows within the last 10 seconds.
        let mut filter = TemporalFilterOperator::with_clock(0, 1.0, 10_000, schema.clone(), clock).expect("filter");
        let batch = |times: Vec<i64>| {
            let column = Arc::new(TimestampMicrosecondArray::from(times));
            ChangeBatch::inserts(RecordBatch::try_new(schema.clone(), vec![column]).expect("batch"))
        };
        let mut out = Output::default();
        // 15 s old: never shown; 5 s old and 1 s old: shown.
        filter.process(0, batch(vec![985_000_000, 995_000_000, 999_000_000]), &mut out).await.expect("process");
        let shown: usize = out
            .take_messages()
            .iter()
            .map(|m| match m {
                crate::dataflow::Message::Data(c) => c.num_rows(),
                _ => 0,
            })
            .sum();
        assert_eq!(shown, 2);
        // 6 seconds later the 5-second-old row is 11 seconds old: retracted.
        now.store(1_006_000_000, Ordering::SeqCst);
        let barrier = Barrier { epoch: 1, checkpoint: false, mutation: None };
        filter.on_barrier(&barrier, &mut out).await.expect("barrier");
        let messages = out.take_messages();
        let [crate::dataflow::Message::Data(change)] = messages.as_slice() else {
            panic!("one retraction: {messages:?}")
        };
        assert_eq!(change.num_rows(), 1);
        assert_eq!(change.weights().value(0), -1);
    }
}
