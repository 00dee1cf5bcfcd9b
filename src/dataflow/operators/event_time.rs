//! Event time at the edges of a view's dataflow.
//!
//! [`EventTimeOperator`] stands right after an input with a `WATERMARK FOR ts AS ts - delay`.
//! It reads the rows in order and keeps the greatest event time seen; a row whose time is
//! below that maximum minus the delay is late: it is dropped, and counted in its
//! [`LateCounter`]. After each batch it emits the watermark `maximum - delay` if that
//! moved. Because lateness is decided row by row in input order, not per batch, a view
//! rebuilt from the same rows (after a restart, or created later over the same source)
//! drops exactly the same rows.
//!
//! [`EmitOnCloseOperator`] is the last operator of a view with `EMIT ON WINDOW CLOSE`. It
//! holds each row's net change until the watermark of its event-time column passes the
//! row's value, then emits it once: the view only ever gains rows, each final.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use async_trait::async_trait;
use datafusion::arrow::array::{Array, Int64Array};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::arrow::row::{OwnedRow, RowConverter, SortField};

use crate::dataflow::checkpoint::{StateReader, StateWriter, read_rows_by_time, write_rows_by_time};
use crate::dataflow::operator::{Operator, Output};
use crate::dataflow::{ChangeBatch, FastMap, Watermark};
use crate::error::{Error, Result};

/// Late rows of one input of one view, shared with the system view that lists them.
#[derive(Debug)]
pub struct LateCounter {
    /// The relation the rows came from.
    pub input: String,
    /// The view that dropped them.
    pub view: String,
    /// Event-time units per millisecond (the values below are in milliseconds).
    units_per_ms: i64,
    rows: AtomicU64,
    /// The watermark (in the event-time column's unit), `i64::MIN` before the first.
    watermark: AtomicI64,
    /// The event time of the last late row, `i64::MIN` before the first.
    last_late: AtomicI64,
}

impl LateCounter {
    pub fn new(input: String, view: String, units_per_ms: i64) -> Self {
        LateCounter {
            input,
            view,
            units_per_ms: units_per_ms.max(1),
            rows: AtomicU64::new(0),
            watermark: AtomicI64::new(i64::MIN),
            last_late: AtomicI64::new(i64::MIN),
        }
    }

    /// Rows dropped as late so far.
    pub fn rows(&self) -> u64 {
        self.rows.load(Ordering::Relaxed)
    }

    /// The current watermark in milliseconds since the epoch, if any.
    pub fn watermark(&self) -> Option<i64> {
        Some(self.watermark.load(Ordering::Relaxed)).filter(|w| *w != i64::MIN)
    }

    /// The event time of the latest late row in milliseconds since the epoch, if any.
    pub fn last_late(&self) -> Option<i64> {
        Some(self.last_late.load(Ordering::Relaxed)).filter(|w| *w != i64::MIN)
    }
}

/// Rows per block when looking for late rows (see [`EventTimeOperator`]'s `process`).
const LATE_CHECK_BLOCK: usize = 1024;

/// Drops late rows of an input and emits its watermarks.
pub struct EventTimeOperator {
    column: usize,
    /// The delay in the column's unit.
    delay: i64,
    /// The greatest event time seen.
    maximum: Option<i64>,
    emitted: Option<i64>,
    late: Arc<LateCounter>,
}

impl EventTimeOperator {
    /// `column` holds the event time; `delay` is in its unit.
    pub fn new(column: usize, delay: i64, late: Arc<LateCounter>) -> Self {
        EventTimeOperator { column, delay, maximum: None, emitted: None, late }
    }

    /// Emits a watermark when the greatest event time seen moved it forward.
    fn advance(&mut self, out: &mut Output) {
        if let Some(watermark) = self.maximum.map(|m| m.saturating_sub(self.delay))
            && self.emitted.is_none_or(|e| watermark > e)
        {
            self.emitted = Some(watermark);
            self.late.watermark.store(watermark.div_euclid(self.late.units_per_ms), Ordering::Relaxed);
            out.watermark(Watermark { column: self.column, value: watermark });
        }
    }
}

/// A timestamp column as integers in its unit.
fn times(input: &ChangeBatch, column: usize) -> Result<Int64Array> {
    let array = input
        .batch()
        .columns()
        .get(column)
        .ok_or_else(|| Error::Internal("the event-time column is missing from its input".into()))?;
    let ints = cast(array, &DataType::Int64)?;
    ints.as_any()
        .downcast_ref::<Int64Array>()
        .cloned()
        .ok_or_else(|| Error::Internal("event times did not cast to integers".into()))
}

#[async_trait]
impl Operator for EventTimeOperator {
    fn name(&self) -> &str {
        "event_time (drops late rows, emits watermarks)"
    }

    async fn process(&mut self, _port: usize, input: ChangeBatch, out: &mut Output) -> Result<()> {
        let times = times(&input, self.column)?;
        let weights = input.weights();
        // Most batches hold no late row: find that out a block at a time, and pass the
        // batch on as it is. A block whose earliest time is not below its latest (or the
        // maximum before it) minus the delay holds no late row; other blocks are checked
        // row by row. Before the first event time there is no watermark: the maximum
        // starts at i64::MIN, and nothing is below i64::MIN minus the delay.
        if times.null_count() == 0 {
            let mut maximum = self.maximum.unwrap_or(i64::MIN);
            let mut any_late = false;
            for (times, weights) in
                times.values().chunks(LATE_CHECK_BLOCK).zip(weights.values().chunks(LATE_CHECK_BLOCK))
            {
                let (earliest, latest) = times.iter().fold((i64::MAX, i64::MIN), |(lo, hi), &t| (lo.min(t), hi.max(t)));
                if earliest >= maximum.max(latest).saturating_sub(self.delay) {
                    maximum = maximum.max(latest);
                    continue;
                }
                for (&time, &weight) in times.iter().zip(weights) {
                    any_late |= (weight > 0) & (time < maximum.saturating_sub(self.delay));
                    maximum = maximum.max(time);
                }
            }
            if !any_late {
                if !times.is_empty() {
                    self.maximum = Some(maximum);
                }
                out.push(input);
                self.advance(out);
                return Ok(());
            }
        }
        let mut keep = Vec::with_capacity(input.num_rows());
        let mut late = 0;
        for i in 0..input.num_rows() {
            // Rows without an event time belong to no window; they pass.
            if !times.is_valid(i) {
                keep.push(true);
                continue;
            }
            let time = times.value(i);
            let watermark = self.maximum.map(|m| m.saturating_sub(self.delay));
            if weights.value(i) > 0 && watermark.is_some_and(|w| time < w) {
                keep.push(false);
                late += 1;
                self.late.last_late.store(time.div_euclid(self.late.units_per_ms), Ordering::Relaxed);
                continue;
            }
            keep.push(true);
            self.maximum = Some(self.maximum.map_or(time, |m| m.max(time)));
        }
        if late > 0 {
            self.late.rows.fetch_add(late, Ordering::Relaxed);
            out.push(input.filter(&keep.into())?);
        } else {
            out.push(input);
        }
        self.advance(out);
        Ok(())
    }

    /// The greatest event time seen and the last watermark emitted (late-row counts are
    /// monitoring, and start again from zero).
    fn checkpoint(&mut self) -> Result<Option<Vec<u8>>> {
        let mut w = StateWriter::default();
        w.opt_i64(self.maximum);
        w.opt_i64(self.emitted);
        Ok(Some(w.finish()))
    }

    fn restore(&mut self, state: &[u8]) -> Result<()> {
        let mut r = StateReader::new(state, "an event-time input");
        self.maximum = r.opt_i64()?;
        self.emitted = r.opt_i64()?;
        if let Some(watermark) = self.emitted {
            self.late.watermark.store(watermark.div_euclid(self.late.units_per_ms), Ordering::Relaxed);
        }
        r.finish()
    }

    async fn on_watermark(&mut self, _port: usize, _watermark: Watermark, _out: &mut Output) -> Result<()> {
        // Watermarks start here.
        Ok(())
    }
}

/// Holds a view's changes until the watermark of `column` passes them, then emits each
/// row's net change once.
pub struct EmitOnCloseOperator {
    column: usize,
    schema: SchemaRef,
    converter: RowConverter,
    /// Event time → row → net weight, for rows not yet final.
    pending: BTreeMap<i64, FastMap<OwnedRow, i64>>,
    /// The latest watermark of `column`.
    watermark: Option<i64>,
}

impl EmitOnCloseOperator {
    pub fn new(column: usize, schema: SchemaRef) -> Result<Self> {
        let fields = schema.fields().iter().map(|f| SortField::new(f.data_type().clone())).collect();
        let converter = RowConverter::new(fields)?;
        Ok(EmitOnCloseOperator { column, schema, converter, pending: BTreeMap::new(), watermark: None })
    }

    /// Emits `rows`, each with its net weight (rows that cancelled out are left out).
    fn emit(&self, rows: Vec<(OwnedRow, i64)>, out: &mut Output) -> Result<()> {
        let rows: Vec<(OwnedRow, i64)> = rows.into_iter().filter(|(_, w)| *w != 0).collect();
        if rows.is_empty() {
            return Ok(());
        }
        if let Some((_, weight)) = rows.iter().find(|(_, w)| *w < 0) {
            return Err(Error::Internal(format!(
                "a row was retracted ({weight}) from a closed window; its input changed below the watermark"
            )));
        }
        let columns = self.converter.convert_rows(rows.iter().map(|(r, _)| r.row()))?;
        let weights = rows.iter().map(|(_, w)| *w).collect();
        out.push(ChangeBatch::from_columns(self.schema.clone(), columns, weights)?);
        Ok(())
    }
}

#[async_trait]
impl Operator for EmitOnCloseOperator {
    fn name(&self) -> &str {
        "emit_on_window_close"
    }

    /// The rows not yet final, by event time, and the latest watermark.
    fn checkpoint(&mut self) -> Result<Option<Vec<u8>>> {
        let mut w = StateWriter::default();
        write_rows_by_time(&mut w, &self.pending);
        w.opt_i64(self.watermark);
        Ok(Some(w.finish()))
    }

    fn restore(&mut self, state: &[u8]) -> Result<()> {
        let mut r = StateReader::new(state, "emit on window close");
        self.pending = read_rows_by_time(&mut r, &self.converter)?;
        self.watermark = r.opt_i64()?;
        r.finish()
    }

    async fn process(&mut self, _port: usize, input: ChangeBatch, out: &mut Output) -> Result<()> {
        let times = times(&input, self.column)?;
        let rows = self.converter.convert_columns(input.batch().columns())?;
        let mut unbounded = Vec::new();
        for i in 0..input.num_rows() {
            let weight = input.weights().value(i);
            if !times.is_valid(i) {
                // No event time: the row belongs to no window and is final as it is.
                unbounded.push((rows.row(i).owned(), weight));
                continue;
            }
            let time = times.value(i);
            if self.watermark.is_some_and(|w| time < w) {
                return Err(Error::Internal(format!(
                    "a change at event time {time} arrived after the watermark {} had closed it",
                    self.watermark.unwrap_or_default()
                )));
            }
            let slot = self.pending.entry(time).or_default();
            let net = slot.entry(rows.row(i).owned()).or_insert(0);
            *net += weight;
        }
        self.emit(unbounded, out)
    }

    async fn on_watermark(&mut self, _port: usize, watermark: Watermark, out: &mut Output) -> Result<()> {
        if watermark.column != self.column || self.watermark.is_some_and(|w| w >= watermark.value) {
            return Ok(());
        }
        self.watermark = Some(watermark.value);
        let open = self.pending.split_off(&watermark.value);
        let closed = std::mem::replace(&mut self.pending, open);
        let rows = closed.into_values().flat_map(|rows| rows.into_iter()).collect();
        self.emit(rows, out)?;
        out.watermark(watermark);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataflow::operator::Message;
    use datafusion::arrow::datatypes::{Field, Schema};
    use datafusion::arrow::record_batch::RecordBatch;
    use rand::{Rng, SeedableRng};

    /// Lateness decided one row at a time, in input order: the definition the operator's
    /// batch-at-a-time fast path must agree with. Adds the rows kept to `kept`.
    fn model(rows: &[(Option<i64>, i64)], delay: i64, maximum: &mut Option<i64>, kept: &mut Vec<(Option<i64>, i64)>) {
        for &(time, weight) in rows {
            let late = time.is_some_and(|t| weight > 0 && maximum.is_some_and(|m| t < m - delay));
            if !late {
                kept.push((time, weight));
                if let Some(t) = time {
                    *maximum = Some(maximum.map_or(t, |m| m.max(t)));
                }
            }
        }
    }

    #[tokio::test]
    async fn late_rows_are_dropped_row_by_row_in_input_order() {
        let schema = Arc::new(Schema::new(vec![Field::new("t", DataType::Int64, true)]));
        let mut rng = rand::rngs::SmallRng::seed_from_u64(11);
        for case in 0..200 {
            // Short and long delays, rising and flat times: some blocks of a long batch
            // pass whole, some hold late rows.
            let delay = if rng.gen_bool(0.5) { rng.gen_range(0..20) } else { rng.gen_range(0..4000) };
            let (step, jitter) = (rng.gen_range(0..4), rng.gen_range(1..30));
            let late = Arc::new(LateCounter::new("s".into(), "v".into(), 1));
            let mut operator = EventTimeOperator::new(0, delay, late.clone());
            let (mut maximum, mut expected, mut got) = (None, Vec::new(), Vec::new());
            let (mut watermarks, mut sent) = (Vec::new(), 0);
            for _ in 0..rng.gen_range(1..6) {
                // Mostly rising times with some behind the maximum, a few NULLs and
                // retractions: some batches take the fast path, some do not.
                let len = if rng.gen_bool(0.2) { rng.gen_range(0..3 * LATE_CHECK_BLOCK) } else { rng.gen_range(0..30) };
                let rows: Vec<(Option<i64>, i64)> = (0..len as i64)
                    .map(|i| {
                        let time =
                            (case % 3 != 0 || !rng.gen_bool(0.1)).then(|| i * step + rng.gen_range(-jitter..jitter));
                        (time, if rng.gen_bool(0.1) { -1 } else { 1 })
                    })
                    .collect();
                model(&rows, delay, &mut maximum, &mut expected);
                sent += rows.len();
                let times = Int64Array::from(rows.iter().map(|r| r.0).collect::<Vec<_>>());
                let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(times)]).expect("batch");
                let weights = Int64Array::from(rows.iter().map(|r| r.1).collect::<Vec<_>>());
                let mut out = Output::default();
                operator
                    .process(0, ChangeBatch::try_new(batch, weights).expect("change"), &mut out)
                    .await
                    .expect("process");
                for message in out.take_messages() {
                    match message {
                        Message::Data(change) => {
                            let times = change.batch().column(0).as_any().downcast_ref::<Int64Array>().expect("ints");
                            got.extend(times.iter().zip(change.weights().values().iter().copied()));
                        }
                        Message::Watermark(w) => watermarks.push(w.value),
                        _ => {}
                    }
                }
                let watermark = maximum.map(|m| m - delay);
                assert_eq!(watermarks.last().copied(), watermark, "case {case}: the watermark");
            }
            assert_eq!(got, expected, "case {case}: the rows kept");
            assert_eq!(late.rows() as usize, sent - got.len(), "case {case}: late rows counted");
        }
    }
}
