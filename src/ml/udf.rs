//! `score(model, f1, …)`, `predict(model, f1, …)` and `score_version(model)` as DataFusion
//! scalar functions.
//!
//! The model name is the first argument, a string literal, so planning can check it: an
//! unknown model is `42704`; a wrong number of features is `42883` and a non-numeric
//! feature `42804`, both naming the model, what it expects and what it got. At run time a
//! call looks the model up once per batch, casts the features to `double precision`
//! arrays and scores the whole batch with the model's kernel; rows with a NULL or NaN
//! feature score NULL and are counted on the model (`DESCRIBE MODEL`).
//!
//! Which version scores a batch: ad-hoc queries use the active version. In a materialized
//! view the functions are bound to the view ([`bind_to_view`]) and use the version in effect
//! for the epoch their operator is processing (see [`super::registry`]), so every operator
//! of a view switches versions at the same barrier.

use std::any::Any;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, Float64Array};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, FieldRef, Float64Type};
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{DataFusionError, ScalarValue};
use datafusion::logical_expr::expr::ScalarFunction;
use datafusion::logical_expr::{
    ColumnarValue, Expr, LogicalPlan, ReturnFieldArgs, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature,
    Volatility,
};
use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};

use super::epoch;
use super::model::{Scorer, valid_rows};
use super::registry::{ModelEntry, ModelRegistry};
use super::train::{is_numeric, sql_type};
use crate::error::Error;

/// The three model functions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Function {
    Score,
    Predict,
    ScoreVersion,
}

impl Function {
    /// The SQL name.
    pub fn name(self) -> &'static str {
        match self {
            Function::Score => "score",
            Function::Predict => "predict",
            Function::ScoreVersion => "score_version",
        }
    }
}

/// Names of the functions whose first argument names a model.
pub const FUNCTION_NAMES: [&str; 3] = ["score", "predict", "score_version"];

/// One of the model functions, reading models from a registry.
pub struct ModelFunction {
    function: Function,
    registry: Arc<ModelRegistry>,
    /// In a materialized view: how it picks versions.
    view: Option<ViewBinding>,
    signature: Signature,
}

/// How a model function in a materialized view picks the version for a batch.
///
/// Rows before the view's first barrier are scored by `initial`, the version active when
/// the view was created; after the operator passes barrier `b`, by the version in effect
/// after `b` ([`ModelEntry::in_effect_after`]). Every operator of the view follows the
/// same rule on the same barriers, so they agree on every row.
#[derive(Clone)]
struct ViewBinding {
    /// The last barrier sent before the view was created.
    start: u64,
    initial: Arc<Scorer>,
}

impl std::fmt::Debug for ModelFunction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let view = self.view.as_ref().map(|v| (v.start, v.initial.model.version));
        f.debug_struct("ModelFunction").field("function", &self.function).field("view", &view).finish()
    }
}

impl PartialEq for ModelFunction {
    fn eq(&self, other: &Self) -> bool {
        let view = |f: &Self| f.view.as_ref().map(|v| (v.start, Arc::as_ptr(&v.initial)));
        self.function == other.function && view(self) == view(other) && Arc::ptr_eq(&self.registry, &other.registry)
    }
}

impl Eq for ModelFunction {}

impl Hash for ModelFunction {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.function.hash(state);
        self.view.as_ref().map(|v| (v.start, Arc::as_ptr(&v.initial) as usize)).hash(state);
        (Arc::as_ptr(&self.registry) as usize).hash(state);
    }
}

impl ModelFunction {
    fn new(function: Function, registry: Arc<ModelRegistry>, view: Option<ViewBinding>) -> Self {
        // Volatile, so that planning never folds a call into a constant (with literal
        // features, or `score_version`): the answer changes when the version does.
        // Materialized views accept these volatile functions (see `sql::view`).
        ModelFunction { function, registry, view, signature: Signature::variadic_any(Volatility::Volatile) }
    }
}

/// The three functions over `registry`, to register on a session.
pub fn functions(registry: &Arc<ModelRegistry>) -> Vec<ScalarUDF> {
    [Function::Score, Function::Predict, Function::ScoreVersion]
        .into_iter()
        .map(|f| ScalarUDF::new_from_impl(ModelFunction::new(f, registry.clone(), None)))
        .collect()
}

fn error(code: &'static str, message: String) -> DataFusionError {
    DataFusionError::External(Box::new(Error::Plan { code, message, position: None }))
}

/// `model "name" does not exist` (42704).
pub fn undefined_model(name: &str) -> Error {
    Error::Plan {
        code: "42704",
        message: format!("model \"{name}\" does not exist; SHOW MODELS lists the models"),
        position: None,
    }
}

fn model_name(function: Function, value: Option<&ScalarValue>) -> datafusion::error::Result<String> {
    match value.and_then(|v| v.try_as_str().flatten()) {
        Some(name) => Ok(name.to_string()),
        None => Err(error(
            "42P13",
            format!(
                "the first argument of {}() must be the model name as a string literal, as in {}('normal_ops', temperature, vibration)",
                function.name(),
                function.name()
            ),
        )),
    }
}

impl ModelFunction {
    fn entry(&self, name: &str) -> datafusion::error::Result<Arc<ModelEntry>> {
        self.registry.get(name).ok_or_else(|| DataFusionError::External(Box::new(undefined_model(name))))
    }
}

impl ScalarUDFImpl for ModelFunction {
    fn name(&self) -> &str {
        self.function.name()
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> datafusion::error::Result<DataType> {
        match self.function {
            Function::Score => Ok(DataType::Float64),
            Function::ScoreVersion => Ok(DataType::Int64),
            Function::Predict => Err(DataFusionError::Internal(
                "predict() has its type from its model: use return_field_from_args".into(),
            )),
        }
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs) -> datafusion::error::Result<FieldRef> {
        let name = model_name(self.function, args.scalar_arguments.first().copied().flatten())?;
        let scorer = self.entry(&name)?.active();
        let model = &scorer.model;
        let data_type = match self.function {
            Function::ScoreVersion => {
                if args.arg_fields.len() != 1 {
                    return Err(error(
                        "42883",
                        format!("score_version() takes only the model name, as in score_version('{name}')"),
                    ));
                }
                DataType::Int64
            }
            Function::Score | Function::Predict => {
                let given = &args.arg_fields[1..];
                if given.len() != model.features.len() {
                    return Err(error(
                        "42883",
                        format!(
                            "model \"{name}\" expects {} features ({}), got {}",
                            model.features.len(),
                            model.feature_list(),
                            given.len()
                        ),
                    ));
                }
                for (i, (field, feature)) in given.iter().zip(&model.features).enumerate() {
                    if !is_numeric(field.data_type()) {
                        return Err(error(
                            "42804",
                            format!(
                                "model \"{name}\" expects numeric features ({}), got {} for feature {} ({})",
                                model.feature_list(),
                                sql_type(field.data_type()),
                                i + 1,
                                feature.name
                            ),
                        ));
                    }
                }
                match self.function {
                    Function::Score => DataType::Float64,
                    _ => model.predict_type().map_err(|why| error("42883", format!("model \"{name}\": {why}")))?,
                }
            }
        };
        Ok(Arc::new(Field::new(self.function.name(), data_type, true)))
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> datafusion::error::Result<ColumnarValue> {
        let name = match args.args.first() {
            Some(ColumnarValue::Scalar(value)) => model_name(self.function, Some(value))?,
            _ => model_name(self.function, None)?,
        };
        let entry = self.entry(&name)?;
        let scorer = match (&self.view, epoch::last_passed()) {
            (Some(view), Some(passed)) if passed > view.start => entry.in_effect_after(passed),
            (Some(view), Some(_)) => view.initial.clone(),
            _ => entry.active(),
        };
        let model = &scorer.model;
        if self.function == Function::ScoreVersion {
            return Ok(ColumnarValue::Scalar(ScalarValue::Int64(Some(model.version as i64))));
        }
        let given = args.args.len() - 1;
        if given != model.features.len() {
            return Err(error(
                "42883",
                format!(
                    "model \"{name}\" version {} expects {} features ({}), got {given}",
                    model.version,
                    model.features.len(),
                    model.feature_list()
                ),
            ));
        }
        let all_scalar = args.args.iter().all(|a| matches!(a, ColumnarValue::Scalar(_)));
        let n = if all_scalar { 1 } else { args.number_rows };
        let mut columns: Vec<Float64Array> = Vec::with_capacity(given);
        for arg in &args.args[1..] {
            let array = arg.to_array(n)?;
            let array = if array.data_type() == &DataType::Float64 { array } else { cast(&array, &DataType::Float64)? };
            columns.push(array.as_primitive::<Float64Type>().clone());
        }
        let refs: Vec<&Float64Array> = columns.iter().collect();
        let (valid, invalid) = valid_rows(&refs, n);
        entry.count(n, invalid);
        let slices: Vec<&[f64]> = columns.iter().map(|c| c.values().as_ref()).collect();
        let result: ArrayRef = match self.function {
            Function::Score => Arc::new(scorer.score(&slices, valid.as_ref(), n)),
            _ => {
                let predicted =
                    scorer.predict(&slices, valid.as_ref(), n).map_err(|e| DataFusionError::External(Box::new(e)))?;
                let wanted = args.return_field.data_type();
                if predicted.data_type() != wanted {
                    return Err(error(
                        "42804",
                        format!(
                            "model \"{name}\" version {} predicts {}, but this statement was planned for {}; plan it again",
                            model.version,
                            sql_type(predicted.data_type()),
                            sql_type(wanted)
                        ),
                    ));
                }
                predicted
            }
        };
        if all_scalar {
            return Ok(ColumnarValue::Scalar(ScalarValue::try_from_array(&result, 0)?));
        }
        Ok(ColumnarValue::Array(result))
    }
}

/// Binds every model function in a materialized view's plan to the view: `start` is the
/// last barrier sent before the view's first rows (see [`ViewBinding`]).
pub fn bind_to_view(plan: LogicalPlan, start: u64) -> crate::Result<LogicalPlan> {
    // One initial version per model for the whole view, so all its operators agree.
    let mut initial: HashMap<String, Arc<Scorer>> = HashMap::new();
    let bound = plan.transform_up_with_subqueries(|node| {
        node.map_expressions(|expr| {
            expr.transform_up(|e| {
                if let Expr::ScalarFunction(call) = &e
                    && let Some(function) = (call.func.inner().as_ref() as &dyn Any).downcast_ref::<ModelFunction>()
                {
                    let name = match call.args.first() {
                        Some(Expr::Literal(value, _)) => model_name(function.function, Some(value))?,
                        _ => model_name(function.function, None)?,
                    };
                    let scorer = match initial.get(&name) {
                        Some(scorer) => scorer.clone(),
                        None => {
                            let scorer = function.entry(&name)?.active();
                            initial.insert(name, scorer.clone());
                            scorer
                        }
                    };
                    let view = ViewBinding { start, initial: scorer };
                    let udf = ModelFunction::new(function.function, function.registry.clone(), Some(view));
                    let args = call.args.clone();
                    return Ok(Transformed::yes(Expr::ScalarFunction(ScalarFunction::new_udf(
                        Arc::new(ScalarUDF::new_from_impl(udf)),
                        args,
                    ))));
                }
                Ok(Transformed::no(e))
            })
        })
    })?;
    Ok(bound.data)
}

/// The models a query's SQL text names in `score`, `predict` or `score_version` calls.
pub fn models_named_in(sql: &str) -> Vec<String> {
    let dialect = PostgreSqlDialect {};
    let Ok(tokens) = Tokenizer::new(&dialect, sql).tokenize() else { return Vec::new() };
    let tokens: Vec<&Token> = tokens.iter().filter(|t| !matches!(t, Token::Whitespace(_))).collect();
    let mut names = Vec::new();
    for window in tokens.windows(3) {
        if let (Token::Word(word), Token::LParen, Token::SingleQuotedString(model)) = (window[0], window[1], window[2])
            && word.quote_style.is_none()
            && FUNCTION_NAMES.contains(&word.value.to_ascii_lowercase().as_str())
            && !names.contains(model)
        {
            names.push(model.clone());
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_models_a_query_names() {
        let sql = "SELECT score('a', x), SCORE ( 'b' , y), predict('a', x), score_version('c'), scores('d') FROM t";
        assert_eq!(models_named_in(sql), vec!["a", "b", "c"]);
    }
}
