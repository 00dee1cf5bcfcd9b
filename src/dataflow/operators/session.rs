//! Session windows: per key, events closer than `gap` to each other form one session,
//! `[first event, last event + gap)`. [`SessionOperator`] adds `window_start` and
//! `window_end` to its input's rows and keeps them right as sessions grow and merge.
//!
//! It keeps each key's rows ordered by event time. A change to a key re-assigns that key's
//! sessions; the operator retracts the rows whose window changed and inserts them with the
//! new one (unchanged rows cancel out). With a watermark on the event-time column, a
//! session that ends at or below the watermark can never grow again (a new event would
//! have to be earlier than the watermark to reach it): its rows are forgotten, and the
//! watermark is forwarded on `window_end`, which no later change goes below.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::{Array, ArrayRef, Int64Array};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::arrow::row::{OwnedRow, RowConverter, SortField};

use crate::dataflow::checkpoint::{StateReader, StateWriter, read_rows_by_time, write_rows_by_time};
use crate::dataflow::operator::{Operator, Output};
use crate::dataflow::{ChangeBatch, FastMap, Watermark};
use crate::error::{Error, Result};

/// The sessions of event times sorted ascending: per time, its session's start and end.
pub fn assign_sessions(sorted_times: &[i64], gap: i64) -> Vec<(i64, i64)> {
    let mut out = Vec::with_capacity(sorted_times.len());
    let mut first = 0;
    for i in 1..=sorted_times.len() {
        let ends_here = i == sorted_times.len() || sorted_times[i] - sorted_times[i - 1] >= gap;
        if ends_here {
            let (start, end) = (sorted_times[first], sorted_times[i - 1].saturating_add(gap));
            out.extend(std::iter::repeat_n((start, end), i - first));
            first = i;
        }
    }
    out
}

/// One key's rows: event time → encoded rows with their multiplicities.
type KeyRows = BTreeMap<i64, FastMap<OwnedRow, i64>>;

/// Adds session windows over `time` (column index) per `keys` (column indices).
pub struct SessionOperator {
    time: usize,
    /// The gap in the time column's unit.
    gap: i64,
    keys: Vec<usize>,
    key_converter: RowConverter,
    row_converter: RowConverter,
    /// The output: the input's columns, then window_start and window_end.
    schema: SchemaRef,
    time_type: DataType,
    /// Per key (encoded; empty without keys), its rows.
    rows: FastMap<Box<[u8]>, KeyRows>,
    /// The watermark of the last sweep for closed sessions (sweeps are at least a gap apart).
    swept: Option<i64>,
}

impl SessionOperator {
    pub fn new(time: usize, gap: i64, keys: Vec<usize>, input: SchemaRef, schema: SchemaRef) -> Result<Self> {
        let field = |i: usize| SortField::new(input.field(i).data_type().clone());
        let key_converter = RowConverter::new(keys.iter().map(|&k| field(k)).collect())?;
        let row_converter = RowConverter::new((0..input.fields().len()).map(field).collect())?;
        let time_type = input.field(time).data_type().clone();
        Ok(SessionOperator {
            time,
            gap,
            keys,
            key_converter,
            row_converter,
            schema,
            time_type,
            rows: FastMap::default(),
            swept: None,
        })
    }

    /// Every row of `rows` (one key) with its session, as (row, weight, start, end).
    fn windows(&self, rows: &KeyRows) -> Vec<(OwnedRow, i64, i64, i64)> {
        let times: Vec<i64> = rows.keys().copied().collect();
        let sessions = assign_sessions(&times, self.gap);
        let mut out = Vec::new();
        for ((_, copies), (start, end)) in rows.iter().zip(sessions) {
            out.extend(copies.iter().map(|(row, weight)| (row.clone(), *weight, start, end)));
        }
        out
    }

    /// Builds the output change for `pieces` (row, weight, window start, window end).
    fn build(&self, pieces: Vec<(OwnedRow, i64, i64, i64)>) -> Result<ChangeBatch> {
        let mut columns = self.row_converter.convert_rows(pieces.iter().map(|p| p.0.row()))?;
        let bound = |values: Vec<i64>| -> Result<ArrayRef> {
            Ok(cast(&(Arc::new(Int64Array::from(values)) as ArrayRef), &self.time_type)?)
        };
        columns.push(bound(pieces.iter().map(|p| p.2).collect())?);
        columns.push(bound(pieces.iter().map(|p| p.3).collect())?);
        let weights = pieces.iter().map(|p| p.1).collect();
        ChangeBatch::from_columns(self.schema.clone(), columns, weights)?.consolidate()
    }
}

#[async_trait]
impl Operator for SessionOperator {
    fn name(&self) -> &str {
        "session_windows"
    }

    /// Every key's rows by event time, and the watermark of the last sweep.
    fn checkpoint(&mut self) -> Result<Option<Vec<u8>>> {
        let mut w = StateWriter::default();
        w.u64(self.rows.len() as u64);
        for (key, rows) in &self.rows {
            w.bytes(key);
            write_rows_by_time(&mut w, rows);
        }
        w.opt_i64(self.swept);
        Ok(Some(w.finish()))
    }

    fn restore(&mut self, state: &[u8]) -> Result<()> {
        let mut r = StateReader::new(state, "session windows");
        self.rows.clear();
        for _ in 0..r.len(16)? {
            let key = Box::from(r.bytes()?);
            let rows = read_rows_by_time(&mut r, &self.row_converter)?;
            self.rows.insert(key, rows);
        }
        self.swept = r.opt_i64()?;
        r.finish()
    }

    async fn process(&mut self, _port: usize, input: ChangeBatch, out: &mut Output) -> Result<()> {
        let batch = input.batch();
        let times = cast(batch.column(self.time), &DataType::Int64)?;
        let times = times
            .as_any()
            .downcast_ref::<Int64Array>()
            .ok_or_else(|| Error::Internal("event times did not cast to integers".into()))?;
        let key_columns: Vec<ArrayRef> = self.keys.iter().map(|&k| batch.column(k).clone()).collect();
        let keys = (!self.keys.is_empty()).then(|| self.key_converter.convert_columns(&key_columns)).transpose()?;
        let rows = self.row_converter.convert_columns(batch.columns())?;
        let mut pieces = Vec::new();
        // Rows without an event time are in no session: they pass with NULL windows.
        let mut timeless = Vec::new();
        let mut changes: FastMap<Box<[u8]>, Vec<(i64, OwnedRow, i64)>> = FastMap::default();
        for i in 0..batch.num_rows() {
            let weight = input.weights().value(i);
            if !times.is_valid(i) {
                timeless.push((i, weight));
                continue;
            }
            let key: Box<[u8]> =
                keys.as_ref().map_or_else(|| Box::from([] as [u8; 0]), |k| Box::from(k.row(i).as_ref()));
            changes.entry(key).or_default().push((times.value(i), rows.row(i).owned(), weight));
        }
        for (key, key_changes) in changes {
            let mut state = self.rows.remove(&key).unwrap_or_default();
            pieces.extend(self.windows(&state).into_iter().map(|(row, w, s, e)| (row, -w, s, e)));
            for (time, row, weight) in key_changes {
                let copies = state.entry(time).or_default();
                let count = copies.entry(row.clone()).or_insert(0);
                *count += weight;
                if *count == 0 {
                    copies.remove(&row);
                }
                if copies.is_empty() {
                    state.remove(&time);
                }
            }
            pieces.extend(self.windows(&state));
            if !state.is_empty() {
                self.rows.insert(key, state);
            }
        }
        if !pieces.is_empty() {
            out.push(self.build(pieces)?);
        }
        if !timeless.is_empty() {
            let indices = datafusion::arrow::array::UInt32Array::from(
                timeless.iter().map(|(i, _)| *i as u32).collect::<Vec<_>>(),
            );
            let mut columns = batch
                .columns()
                .iter()
                .map(|c| datafusion::arrow::compute::take(c, &indices, None))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            columns.push(datafusion::arrow::array::new_null_array(&self.time_type, timeless.len()));
            columns.push(datafusion::arrow::array::new_null_array(&self.time_type, timeless.len()));
            let weights = timeless.iter().map(|(_, w)| *w).collect();
            out.push(ChangeBatch::from_columns(self.schema.clone(), columns, weights)?);
        }
        Ok(())
    }

    async fn on_watermark(&mut self, _port: usize, watermark: Watermark, out: &mut Output) -> Result<()> {
        if watermark.column != self.time {
            return Ok(());
        }
        out.watermark(Watermark { column: self.schema.fields().len() - 1, value: watermark.value });
        // Forget sessions that end at or below the watermark: no event can join them. Each
        // sweep visits every key, so sweeps wait until the watermark moved a gap.
        if self.swept.is_some_and(|s| watermark.value < s.saturating_add(self.gap)) {
            return Ok(());
        }
        self.swept = Some(watermark.value);
        let gap = self.gap;
        self.rows.retain(|_, state| {
            let times: Vec<i64> = state.keys().copied().collect();
            let sessions = assign_sessions(&times, gap);
            let open_from = sessions.iter().position(|(_, end)| *end > watermark.value);
            match open_from {
                None => false,
                Some(0) => true,
                Some(n) => {
                    let keep_from = times[n];
                    *state = state.split_off(&keep_from);
                    true
                }
            }
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_closer_than_the_gap_share_a_session() {
        // Gap 10: 0, 5, 14 are one session; 24 is exactly one gap after 14, a new one.
        assert_eq!(assign_sessions(&[0, 5, 14, 24, 30], 10), vec![(0, 24), (0, 24), (0, 24), (24, 40), (24, 40)]);
        assert!(assign_sessions(&[], 10).is_empty());
    }
}
