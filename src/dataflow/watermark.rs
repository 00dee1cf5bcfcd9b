//! How watermarks move through operators.
//!
//! A [`Watermark`] says that no change (insert or retraction) with a value below `value`
//! in column `column` will arrive on an edge. Values are the column's own integer
//! representation: a timestamp column's count of its unit since the epoch.
//!
//! - A projection derives a watermark for every output column that is a non-decreasing
//!   function of the watermarked input column and constants ([`monotone_input`]): the
//!   column itself, casts, `± constant`, `date_bin` and `date_trunc`. This is how
//!   `window_start` and `window_end` of `TUMBLE` and `HOP` get theirs. The derived value is
//!   the expression evaluated at the input watermark ([`Derivation`]).
//! - An operator with several inputs forwards, per column, the minimum over its inputs
//!   ([`MinimumOverInputs`]).

use std::collections::HashMap;
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, Int64Array, RecordBatchOptions, new_null_array};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::logical_expr::Operator as BinaryOp;
use datafusion::physical_expr::ScalarFunctionExpr;
use datafusion::physical_expr::expressions::{BinaryExpr, CastExpr, Column, Literal, TryCastExpr};
use datafusion::physical_plan::PhysicalExpr;

use super::Watermark;
use super::checkpoint::{StateReader, StateWriter};
use crate::error::{Error, Result};

/// Functions of time that never decrease as their time argument grows (other arguments
/// constant), with the position of that argument.
const MONOTONE_FUNCTIONS: &[(&str, usize)] = &[("date_bin", 1), ("date_trunc", 1)];

/// The input column `expr` is a non-decreasing function of, when every other leaf is a
/// constant.
pub fn monotone_input(expr: &Arc<dyn PhysicalExpr>) -> Option<usize> {
    let any = expr.as_ref() as &dyn std::any::Any;
    if let Some(column) = any.downcast_ref::<Column>() {
        return Some(column.index());
    }
    if let Some(cast) = any.downcast_ref::<CastExpr>() {
        return is_time_or_integer(cast.cast_type()).then(|| monotone_input(cast.expr())).flatten();
    }
    if let Some(cast) = any.downcast_ref::<TryCastExpr>() {
        return is_time_or_integer(cast.cast_type()).then(|| monotone_input(cast.expr())).flatten();
    }
    if let Some(binary) = any.downcast_ref::<BinaryExpr>() {
        let constant = |e: &Arc<dyn PhysicalExpr>| is_literal(e);
        return match binary.op() {
            BinaryOp::Plus if constant(binary.left()) => monotone_input(binary.right()),
            BinaryOp::Plus | BinaryOp::Minus if constant(binary.right()) => monotone_input(binary.left()),
            _ => None,
        };
    }
    if let Some(function) = any.downcast_ref::<ScalarFunctionExpr>() {
        let (_, position) = MONOTONE_FUNCTIONS.iter().find(|(name, _)| *name == function.name())?;
        let args = function.args();
        let others_constant = args.iter().enumerate().all(|(i, a)| i == *position || is_literal(a));
        return if others_constant { args.get(*position).and_then(monotone_input) } else { None };
    }
    None
}

fn is_literal(expr: &Arc<dyn PhysicalExpr>) -> bool {
    (expr.as_ref() as &dyn std::any::Any).downcast_ref::<Literal>().is_some()
}

/// Whether a cast to `data_type` keeps order for times (and integer representations).
pub fn is_time_or_integer(data_type: &DataType) -> bool {
    matches!(data_type, DataType::Timestamp(..) | DataType::Date32 | DataType::Date64) || data_type.is_integer()
}

/// Units of a timestamp type per millisecond (`None` for seconds, which a millisecond
/// delay cannot be counted in, and for other types).
pub fn units_per_ms(data_type: &DataType) -> Option<i64> {
    use datafusion::arrow::datatypes::TimeUnit;
    match data_type {
        DataType::Timestamp(TimeUnit::Millisecond, _) => Some(1),
        DataType::Timestamp(TimeUnit::Microsecond, _) => Some(1_000),
        DataType::Timestamp(TimeUnit::Nanosecond, _) => Some(1_000_000),
        _ => None,
    }
}

/// Whether a column of this type can carry a watermark.
pub fn carries_watermark(data_type: &DataType) -> bool {
    matches!(data_type, DataType::Timestamp(..))
}

/// A one-row column of `data_type` holding the watermark `value`.
pub fn value_array(value: i64, data_type: &DataType) -> Result<ArrayRef> {
    Ok(cast(&(Arc::new(Int64Array::from(vec![value])) as ArrayRef), data_type)?)
}

/// The first value of `array` in its integer representation (`None` when NULL).
pub fn first_value(array: &ArrayRef) -> Result<Option<i64>> {
    let ints = cast(array, &DataType::Int64)?;
    let ints = ints
        .as_any()
        .downcast_ref::<Int64Array>()
        .ok_or_else(|| Error::Internal("a watermark value is not an integer".into()))?;
    Ok((!ints.is_empty() && ints.is_valid(0)).then(|| ints.value(0)))
}

/// The watermarks of a projection's outputs, derived from its input's.
pub struct Derivation {
    input: SchemaRef,
    output: SchemaRef,
    /// (output column, input column, expression) for every monotone output.
    monotone: Vec<(usize, usize, Arc<dyn PhysicalExpr>)>,
}

impl Derivation {
    pub fn new(input: SchemaRef, output: SchemaRef, exprs: &[Arc<dyn PhysicalExpr>]) -> Self {
        let monotone = exprs
            .iter()
            .enumerate()
            .filter_map(|(i, e)| monotone_input(e).map(|c| (i, c, e.clone())))
            .filter(|(i, _, _)| carries_watermark(output.field(*i).data_type()))
            .collect();
        // The batch a watermark is evaluated on has NULLs in every other column.
        let fields: Vec<_> = input.fields().iter().map(|f| f.as_ref().clone().with_nullable(true)).collect();
        let input = Arc::new(datafusion::arrow::datatypes::Schema::new(fields));
        Derivation { input, output, monotone }
    }

    /// The output watermarks that follow from `watermark` on the input.
    pub fn derive(&self, watermark: Watermark) -> Result<Vec<Watermark>> {
        let mut derived = Vec::new();
        let affected: Vec<_> = self.monotone.iter().filter(|(_, input, _)| *input == watermark.column).collect();
        if affected.is_empty() {
            return Ok(derived);
        }
        // The expressions at the watermark: every other column is NULL, and the
        // expressions read none of them.
        let columns = self
            .input
            .fields()
            .iter()
            .enumerate()
            .map(|(i, f)| {
                if i == watermark.column {
                    value_array(watermark.value, f.data_type())
                } else {
                    Ok(new_null_array(f.data_type(), 1))
                }
            })
            .collect::<Result<Vec<_>>>()?;
        let options = RecordBatchOptions::new().with_row_count(Some(1));
        let batch = RecordBatch::try_new_with_options(self.input.clone(), columns, &options)?;
        for (output, _, expr) in affected {
            let value = expr.evaluate(&batch)?.into_array(1)?;
            let value = cast(&value, self.output.field(*output).data_type())?;
            if let Some(value) = first_value(&value)? {
                derived.push(Watermark { column: *output, value });
            }
        }
        Ok(derived)
    }
}

/// Per column, the least watermark over all inputs of an operator: a column's watermark
/// moves only once every input has one.
pub struct MinimumOverInputs {
    inputs: usize,
    /// column → per input, its latest watermark.
    latest: HashMap<usize, Vec<Option<i64>>>,
    /// column → what was forwarded.
    forwarded: HashMap<usize, i64>,
}

impl MinimumOverInputs {
    pub fn new(inputs: usize) -> Self {
        MinimumOverInputs { inputs, latest: HashMap::new(), forwarded: HashMap::new() }
    }

    /// Every input's latest watermark and what was forwarded: the whole checkpointed state
    /// of an operator that only merges watermarks.
    pub fn checkpoint(&self) -> Vec<u8> {
        let mut w = StateWriter::default();
        w.u64(self.latest.len() as u64);
        for (column, inputs) in &self.latest {
            w.u64(*column as u64);
            w.u64(inputs.len() as u64);
            inputs.iter().for_each(|v| w.opt_i64(*v));
        }
        w.u64(self.forwarded.len() as u64);
        for (column, value) in &self.forwarded {
            w.u64(*column as u64);
            w.i64(*value);
        }
        w.finish()
    }

    /// Loads what [`MinimumOverInputs::checkpoint`] wrote.
    pub fn restore(&mut self, state: &[u8]) -> Result<()> {
        let mut r = StateReader::new(state, "merged watermarks");
        self.latest.clear();
        for _ in 0..r.len(16)? {
            let column = r.u64()? as usize;
            let inputs = (0..r.len(16)?).map(|_| r.opt_i64()).collect::<Result<Vec<_>>>()?;
            if inputs.len() != self.inputs {
                return Err(Error::Corrupt {
                    location: "checkpointed watermarks".into(),
                    reason: format!("{} inputs where the operator has {}", inputs.len(), self.inputs),
                });
            }
            self.latest.insert(column, inputs);
        }
        self.forwarded.clear();
        for _ in 0..r.len(16)? {
            let column = r.u64()? as usize;
            self.forwarded.insert(column, r.i64()?);
        }
        r.finish()
    }

    /// Records `watermark` from input `port`; returns the watermark to forward, if the
    /// minimum advanced.
    pub fn update(&mut self, port: usize, watermark: Watermark) -> Option<Watermark> {
        let per_input = self.latest.entry(watermark.column).or_insert_with(|| vec![None; self.inputs]);
        let slot = per_input.get_mut(port)?;
        *slot = Some(slot.map_or(watermark.value, |v| v.max(watermark.value)));
        let least = per_input.iter().copied().collect::<Option<Vec<i64>>>()?.into_iter().min()?;
        let forwarded = self.forwarded.get(&watermark.column);
        if forwarded.is_some_and(|f| *f >= least) {
            return None;
        }
        self.forwarded.insert(watermark.column, least);
        Some(Watermark { column: watermark.column, value: least })
    }
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::datatypes::{Field, Schema, TimeUnit};
    use datafusion::common::ScalarValue;
    use datafusion::logical_expr::ScalarUDF;

    use super::*;

    #[test]
    fn the_least_input_watermark_is_forwarded_once_all_inputs_have_one() {
        let mut min = MinimumOverInputs::new(2);
        assert_eq!(min.update(0, Watermark { column: 1, value: 10 }), None);
        assert_eq!(min.update(1, Watermark { column: 1, value: 7 }), Some(Watermark { column: 1, value: 7 }));
        assert_eq!(min.update(1, Watermark { column: 1, value: 12 }), Some(Watermark { column: 1, value: 10 }));
        // Nothing new: input 0 still holds it at 10; a lower value never moves it back.
        assert_eq!(min.update(1, Watermark { column: 1, value: 11 }), None);
        assert_eq!(min.update(0, Watermark { column: 1, value: 3 }), None);
    }

    #[test]
    fn window_bounds_derive_their_watermark_from_the_time_column() {
        let ts = DataType::Timestamp(TimeUnit::Millisecond, None);
        let input: SchemaRef =
            Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, true), Field::new("ts", ts.clone(), true)]));
        let minute = ScalarValue::IntervalMonthDayNano(Some(datafusion::arrow::datatypes::IntervalMonthDayNano::new(
            0,
            0,
            60_000_000_000,
        )));
        let date_bin = datafusion::functions::datetime::date_bin();
        let args: Vec<Arc<dyn PhysicalExpr>> =
            vec![Arc::new(Literal::new(minute.clone())), Arc::new(Column::new("ts", 1))];
        let start: Arc<dyn PhysicalExpr> = Arc::new(ScalarFunctionExpr::new(
            "date_bin",
            Arc::clone(&date_bin) as Arc<ScalarUDF>,
            args,
            Arc::new(Field::new("window_start", ts.clone(), true)),
            Arc::new(datafusion::common::config::ConfigOptions::default()),
        ));
        let end: Arc<dyn PhysicalExpr> =
            Arc::new(BinaryExpr::new(start.clone(), BinaryOp::Plus, Arc::new(Literal::new(minute))));
        let value: Arc<dyn PhysicalExpr> = Arc::new(Column::new("v", 0));
        let output: SchemaRef = Arc::new(Schema::new(vec![
            Field::new("v", DataType::Int64, true),
            Field::new("window_start", ts.clone(), true),
            Field::new("window_end", ts, true),
        ]));
        let derivation = Derivation::new(input, output, &[value, start, end]);
        // 10:05:30 → the window [10:05, 10:06): rows to come are in it or later ones.
        let at = 36_330_000;
        let derived = derivation.derive(Watermark { column: 1, value: at }).expect("derive");
        assert_eq!(
            derived,
            vec![Watermark { column: 1, value: 36_300_000 }, Watermark { column: 2, value: 36_360_000 }]
        );
        // Watermarks on other columns derive nothing.
        assert!(derivation.derive(Watermark { column: 0, value: 5 }).expect("derive").is_empty());
    }
}
