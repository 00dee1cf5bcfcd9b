//! Temporal filters: `WHERE ts > now() - INTERVAL '1 hour'` in a materialized view keeps a
//! sliding window of recent rows, which retract as they age out. It is the one use of
//! `now()` a view allows.
//!
//! Before the planner's optimiser would fold `now()` into a constant, [`rewrite`] turns each
//! such conjunct into `freshet_recent(ts, 3600000)` (the window in milliseconds), a volatile
//! function the optimiser leaves alone. Lowering finds it in a filter ([`split`]) and runs a
//! [`crate::dataflow::operators::TemporalFilterOperator`] there.

use std::sync::Arc;

use datafusion::arrow::array::BooleanArray;
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, TimeUnit};
use datafusion::common::ScalarValue;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::error::Result as DfResult;
use datafusion::logical_expr::utils::{conjunction, split_conjunction};
use datafusion::logical_expr::{
    ColumnarValue, Expr, LogicalPlan, Operator, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};

use crate::error::{Error, Result};

/// The marker function's name.
pub const FUNCTION: &str = "freshet_recent";

/// Rewrites `ts > now() - interval` (and `>=`, either side) in filters into the marker.
pub fn rewrite(plan: LogicalPlan) -> Result<LogicalPlan> {
    let rewritten = plan.transform_up(|node| {
        let LogicalPlan::Filter(filter) = &node else { return Ok(Transformed::no(node)) };
        let mut changed = false;
        let conjuncts: Vec<Expr> = split_conjunction(&filter.predicate)
            .into_iter()
            .map(|c| match recent(c) {
                Some((column, window_ms)) => {
                    changed = true;
                    marker().call(vec![column, Expr::Literal(ScalarValue::Int64(Some(window_ms)), None)])
                }
                None => c.clone(),
            })
            .collect();
        if !changed {
            return Ok(Transformed::no(node));
        }
        let predicate = conjunction(conjuncts).expect("a filter has a conjunct");
        let filter = datafusion::logical_expr::Filter::try_new(predicate, filter.input.clone())?;
        Ok(Transformed::yes(LogicalPlan::Filter(filter)))
    })?;
    Ok(rewritten.data)
}

/// `(ts, window)` when `expr` is `ts > now() - window` or one of its spellings.
fn recent(expr: &Expr) -> Option<Recent> {
    let Expr::BinaryExpr(b) = expr else { return None };
    let (column, bound) = match b.op {
        Operator::Gt | Operator::GtEq => (b.left.as_ref(), b.right.as_ref()),
        Operator::Lt | Operator::LtEq => (b.right.as_ref(), b.left.as_ref()),
        _ => return None,
    };
    if !matches!(column.clone().unalias(), Expr::Column(_)) {
        return None;
    }
    let window = match bound {
        Expr::ScalarFunction(f) if f.name() == "now" => 0,
        Expr::BinaryExpr(b) if b.op == Operator::Minus => match (b.left.as_ref(), b.right.as_ref()) {
            (Expr::ScalarFunction(f), Expr::Literal(value, _)) if f.name() == "now" => interval_ms(value)?,
            _ => return None,
        },
        _ => return None,
    };
    Some((column.clone(), window))
}

/// A constant interval in milliseconds (months are not a fixed length: `None`).
pub(crate) fn interval_ms(value: &ScalarValue) -> Option<i64> {
    match value {
        ScalarValue::IntervalMonthDayNano(Some(v)) if v.months == 0 => {
            Some(i64::from(v.days) * 86_400_000 + v.nanoseconds / 1_000_000)
        }
        ScalarValue::IntervalDayTime(Some(v)) => Some(i64::from(v.days) * 86_400_000 + i64::from(v.milliseconds)),
        _ => None,
    }
    .filter(|ms| *ms >= 0)
}

/// A temporal condition: the compared column's expression and the window in milliseconds.
pub type Recent = (Expr, i64);

/// A filter's conjuncts split into the temporal one and the rest. More than one temporal
/// conjunct is refused.
pub fn split(predicate: &Expr) -> Result<(Option<Recent>, Option<Expr>)> {
    let mut temporal = None;
    let mut rest = Vec::new();
    for conjunct in split_conjunction(predicate) {
        match conjunct {
            Expr::ScalarFunction(f) if f.name() == FUNCTION => {
                let window = match f.args.get(1) {
                    Some(Expr::Literal(ScalarValue::Int64(Some(ms)), _)) => *ms,
                    _ => return Err(Error::Internal("a temporal filter without its window".into())),
                };
                if temporal.replace((f.args[0].clone(), window)).is_some() {
                    return Err(Error::not_supported("two conditions on now() in one materialized view filter"));
                }
            }
            other => rest.push(other.clone()),
        }
    }
    Ok((temporal, conjunction(rest)))
}

/// Microseconds per unit of a timestamp type.
pub fn micros_per_unit(data_type: &DataType) -> Option<f64> {
    match data_type {
        DataType::Timestamp(TimeUnit::Second, _) => Some(1_000_000.0),
        DataType::Timestamp(TimeUnit::Millisecond, _) => Some(1_000.0),
        DataType::Timestamp(TimeUnit::Microsecond, _) => Some(1.0),
        DataType::Timestamp(TimeUnit::Nanosecond, _) => Some(0.001),
        _ => None,
    }
}

/// The marker function.
pub fn marker() -> Arc<ScalarUDF> {
    Arc::new(ScalarUDF::new_from_impl(RecentFunction { signature: Signature::any(2, Volatility::Volatile) }))
}

/// `freshet_recent(ts, window_ms)`: `ts > now() - window`, evaluated with the clock.
#[derive(Debug, PartialEq, Eq, Hash)]
struct RecentFunction {
    signature: Signature,
}

impl ScalarUDFImpl for RecentFunction {
    fn name(&self) -> &str {
        FUNCTION
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> DfResult<DataType> {
        Ok(DataType::Boolean)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let [times, window] = args.args.as_slice() else {
            return Err(datafusion::error::DataFusionError::Internal(format!("{FUNCTION} takes two arguments")));
        };
        let times = times.to_array(args.number_rows)?;
        let scale = micros_per_unit(times.data_type()).unwrap_or(1.0);
        let times = cast(&times, &DataType::Int64)?;
        let times = datafusion::common::cast::as_int64_array(&times)?;
        let window = match window {
            ColumnarValue::Scalar(ScalarValue::Int64(Some(ms))) => *ms,
            _ => 0,
        };
        let oldest = chrono::Utc::now().timestamp_micros() - window * 1_000;
        let recent: BooleanArray = times.iter().map(|t| t.map(|t| (t as f64 * scale) as i64 > oldest)).collect();
        Ok(ColumnarValue::Array(Arc::new(recent)))
    }
}
