//! Training: the rows of a batch query in, a [`Model`] out.
//!
//! [`TrainingSet::from_batches`] checks the columns (numeric features; NULLs refused unless
//! `impute = 'mean'`) and lays them out as an ndarray matrix; [`train`] fits the algorithm
//! and computes training metrics with the same kernels that score live rows, so the
//! metrics describe exactly the model that will be served. Both are CPU-bound and
//! synchronous: the catalog runs them on a blocking thread, off the serving path.

use std::collections::BTreeMap;
use std::time::Instant;

use datafusion::arrow::array::{Array, AsArray, Float64Array, RecordBatch};
use datafusion::arrow::compute::{cast, concat};
use datafusion::arrow::datatypes::{DataType, Int64Type, Schema};
use linfa::prelude::*;
use ndarray::{Array1, Array2};
use rand_xoshiro::Xoshiro256Plus;
use rand_xoshiro::rand_core::SeedableRng;

use super::model::{Column, FORMAT, FORMAT_VERSION, Label, Model, Scorer, Trained, TreeNode, valid_rows};
use crate::error::{Error, Result};

/// The algorithms `CREATE MODEL … USING` accepts, with the parameters each takes.
pub const ALGORITHMS: &[(&str, &[&str])] = &[
    ("kmeans", &["k", "max_iter", "n_runs", "seed", "impute"]),
    ("gaussian_mixture", &["components", "max_iter", "seed", "impute"]),
    ("zscore", &["impute"]),
    ("linear_regression", &["impute"]),
    ("logistic_regression", &["max_iter", "alpha", "positive", "impute"]),
    ("decision_tree", &["max_depth", "positive", "impute"]),
];

/// Whether the algorithm learns from a label (the query's last column).
pub fn supervised(algorithm: &str) -> bool {
    matches!(algorithm, "linear_regression" | "logistic_regression" | "decision_tree")
}

/// Checks the algorithm name and its parameters before any row is read.
pub fn check_params(name: &str, algorithm: &str, params: &BTreeMap<String, String>) -> Result<()> {
    let Some((_, allowed)) = ALGORITHMS.iter().find(|(a, _)| *a == algorithm) else {
        let known: Vec<&str> = ALGORITHMS.iter().map(|(a, _)| *a).collect();
        return Err(plan_error(
            "22023",
            format!("model \"{name}\": unknown algorithm \"{algorithm}\"; use one of {}", known.join(", ")),
        ));
    };
    for key in params.keys() {
        if !allowed.contains(&key.as_str()) {
            return Err(plan_error(
                "22023",
                format!("model \"{name}\": {algorithm} has no parameter \"{key}\"; it takes {}", allowed.join(", ")),
            ));
        }
    }
    if let Some(impute) = params.get("impute")
        && impute != "mean"
        && impute != "none"
    {
        return Err(plan_error("22023", format!("model \"{name}\": impute = '{impute}' is not 'mean' or 'none'")));
    }
    if algorithm == "kmeans" && !params.contains_key("k") {
        return Err(plan_error("22023", format!("model \"{name}\": kmeans needs k, the number of clusters (k = 4)")));
    }
    Ok(())
}

fn plan_error(code: &'static str, message: String) -> Error {
    Error::Plan { code, message, position: None }
}

/// The training rows: features as a matrix, the label column if any.
pub struct TrainingSet {
    pub features: Vec<Column>,
    pub label: Option<Column>,
    /// rows × features.
    pub x: Array2<f64>,
    /// The label column as the query returned it.
    pub y: Option<datafusion::arrow::array::ArrayRef>,
}

/// The SQL name of an Arrow type, for messages and model files.
pub fn sql_type(data_type: &DataType) -> String {
    match data_type {
        DataType::Int8 | DataType::Int16 | DataType::UInt8 => "smallint".into(),
        DataType::Int32 | DataType::UInt16 => "integer".into(),
        DataType::Int64 | DataType::UInt32 | DataType::UInt64 => "bigint".into(),
        DataType::Float16 | DataType::Float32 => "real".into(),
        DataType::Float64 => "double precision".into(),
        DataType::Decimal128(p, s) | DataType::Decimal256(p, s) => format!("numeric({p},{s})"),
        DataType::Boolean => "boolean".into(),
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => "text".into(),
        DataType::Timestamp(_, None) => "timestamp".into(),
        DataType::Timestamp(_, Some(_)) => "timestamptz".into(),
        DataType::Date32 | DataType::Date64 => "date".into(),
        other => other.to_string().to_lowercase(),
    }
}

/// Whether values of this type can be features (they are scored as double precision).
pub fn is_numeric(data_type: &DataType) -> bool {
    data_type.is_numeric() || matches!(data_type, DataType::Null)
}

impl TrainingSet {
    /// Lays out the query's rows. Unsupervised algorithms use every column as a feature;
    /// supervised ones take the last column as the label.
    pub fn from_batches(
        name: &str,
        algorithm: &str,
        schema: &Schema,
        batches: &[RecordBatch],
        impute: bool,
    ) -> Result<TrainingSet> {
        let width = schema.fields().len();
        let feature_count = if supervised(algorithm) { width.saturating_sub(1) } else { width };
        if feature_count == 0 {
            let needs = if supervised(algorithm) {
                "at least one feature column and a label column last"
            } else {
                "at least one feature column"
            };
            return Err(plan_error("42601", format!("model \"{name}\": {algorithm} needs {needs}")));
        }
        let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
        if rows == 0 {
            return Err(plan_error(
                "22023",
                format!("model \"{name}\": the training query returned no rows; nothing was created"),
            ));
        }
        let column = |i: usize| -> Result<datafusion::arrow::array::ArrayRef> {
            let parts: Vec<&dyn Array> = batches.iter().map(|b| b.column(i).as_ref()).collect();
            Ok(concat(&parts)?)
        };
        let mut features = Vec::new();
        let mut x = Array2::<f64>::zeros((rows, feature_count));
        for i in 0..feature_count {
            let field = schema.field(i);
            if !is_numeric(field.data_type()) {
                return Err(Error::TypeMismatch {
                    message: format!(
                        "model \"{name}\": feature \"{}\" is {}; features must be numeric (smallint, integer, bigint, real, double precision, numeric)",
                        field.name(),
                        sql_type(field.data_type())
                    ),
                    position: None,
                });
            }
            let values = cast(&column(i)?, &DataType::Float64)?;
            let values = values.as_primitive::<datafusion::arrow::datatypes::Float64Type>().clone();
            let (_, missing) = valid_rows(&[&values], rows);
            if missing > 0 && !impute {
                return Err(plan_error(
                    "22004",
                    format!(
                        "model \"{name}\": feature \"{}\" is NULL or NaN in {missing} of {rows} training rows; filter them out (WHERE {} IS NOT NULL) or add impute = 'mean'",
                        field.name(),
                        field.name()
                    ),
                ));
            }
            let mean = present_mean(&values);
            if missing > 0 && mean.is_none() {
                return Err(plan_error(
                    "22004",
                    format!("model \"{name}\": feature \"{}\" has no value to impute from", field.name()),
                ));
            }
            let fill = mean.unwrap_or(0.0);
            for (r, target) in x.column_mut(i).iter_mut().enumerate() {
                let v = values.value(r);
                *target = if values.is_null(r) || v.is_nan() { fill } else { v };
            }
            features.push(Column { name: field.name().clone(), sql_type: sql_type(field.data_type()) });
        }
        let (label, y) = if supervised(algorithm) {
            let field = schema.field(width - 1);
            let y = column(width - 1)?;
            if y.null_count() > 0 {
                return Err(plan_error(
                    "22004",
                    format!(
                        "model \"{name}\": the label \"{}\" is NULL in {} training rows; labels cannot be imputed",
                        field.name(),
                        y.null_count()
                    ),
                ));
            }
            (Some(Column { name: field.name().clone(), sql_type: sql_type(field.data_type()) }), Some(y))
        } else {
            (None, None)
        };
        Ok(TrainingSet { features, label, x, y })
    }
}

fn present_mean(values: &Float64Array) -> Option<f64> {
    let (mut sum, mut n) = (0.0, 0usize);
    for v in values.iter().flatten() {
        if !v.is_nan() {
            sum += v;
            n += 1;
        }
    }
    (n > 0).then(|| sum / n as f64)
}

/// What to record about where a model came from.
pub struct Provenance {
    pub name: String,
    pub version: u32,
    pub training_query: Option<String>,
    pub retrain_every: Option<String>,
}

/// Fits `algorithm` on `data` and returns the model, ready to store.
pub fn train(
    algorithm: &str,
    params: &BTreeMap<String, String>,
    data: &TrainingSet,
    provenance: Provenance,
) -> Result<Model> {
    let name = provenance.name.clone();
    let started = Instant::now();
    let rows = data.x.nrows();
    tracing::info!(model = %name, algorithm, rows, features = data.x.ncols(), "training started");
    let failed = |e: String| plan_error("22023", format!("model \"{name}\": training {algorithm} failed: {e}"));
    let int_param = |key: &str, default: u64| -> Result<u64> {
        match params.get(key) {
            None => Ok(default),
            Some(v) => v
                .trim()
                .parse::<u64>()
                .map_err(|_| plan_error("22023", format!("model \"{name}\": {key} = '{v}' is not a whole number"))),
        }
    };
    let float_param = |key: &str, default: f64| -> Result<f64> {
        match params.get(key) {
            None => Ok(default),
            Some(v) => v
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|f| f.is_finite())
                .ok_or_else(|| plan_error("22023", format!("model \"{name}\": {key} = '{v}' is not a number"))),
        }
    };
    let seed = int_param("seed", 0)?;
    let trained = match algorithm {
        "kmeans" => {
            let k = int_param("k", 0)? as usize;
            if k == 0 || k > rows {
                return Err(plan_error(
                    "22023",
                    format!(
                        "model \"{name}\": kmeans with k = {k} needs k between 1 and the number of training rows ({rows}); nothing was created"
                    ),
                ));
            }
            let dataset = DatasetBase::from(data.x.clone());
            let fitted = linfa_clustering::KMeans::params_with_rng(k, Xoshiro256Plus::seed_from_u64(seed))
                .max_n_iterations(int_param("max_iter", 300)?)
                .n_runs(int_param("n_runs", 10)?.max(1) as usize)
                .fit(&dataset)
                .map_err(|e| failed(e.to_string()))?;
            Trained::Kmeans { centroids: rows_of(fitted.centroids()) }
        }
        "gaussian_mixture" => {
            let components = int_param("components", 1)? as usize;
            if components == 0 || components > rows {
                return Err(plan_error(
                    "22023",
                    format!(
                        "model \"{name}\": gaussian_mixture with components = {components} needs between 1 and the number of training rows ({rows}); nothing was created"
                    ),
                ));
            }
            let dataset = DatasetBase::from(data.x.clone());
            let fitted = linfa_clustering::GaussianMixtureModel::params_with_rng(
                components,
                Xoshiro256Plus::seed_from_u64(seed),
            )
            .max_n_iterations(int_param("max_iter", 100)?)
            .fit(&dataset)
            .map_err(|e| failed(e.to_string()))?;
            let covariances = fitted.covariances().outer_iter().map(|m| rows_of(&m.to_owned())).collect();
            Trained::GaussianMixture { weights: fitted.weights().to_vec(), means: rows_of(fitted.means()), covariances }
        }
        "zscore" => {
            if rows < 2 {
                return Err(plan_error(
                    "22023",
                    format!("model \"{name}\": zscore needs at least 2 training rows for a standard deviation"),
                ));
            }
            let mut means = Vec::new();
            let mut std_devs = Vec::new();
            for (column, feature) in data.x.columns().into_iter().zip(&data.features) {
                let mean = column.sum() / rows as f64;
                let var = column.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / (rows - 1) as f64;
                if var <= 0.0 {
                    return Err(plan_error(
                        "22023",
                        format!(
                            "model \"{name}\": feature \"{}\" has the same value in every training row; zscore needs it to vary",
                            feature.name
                        ),
                    ));
                }
                means.push(mean);
                std_devs.push(var.sqrt());
            }
            Trained::Zscore { means, std_devs }
        }
        "linear_regression" => {
            let y = data.y.as_ref().ok_or_else(|| Error::Internal("regression without a label".into()))?;
            let label = data.label.as_ref().map(|l| l.name.as_str()).unwrap_or_default();
            if !is_numeric(y.data_type()) {
                return Err(Error::TypeMismatch {
                    message: format!(
                        "model \"{name}\": the label \"{label}\" is {}; linear_regression predicts a number",
                        sql_type(y.data_type())
                    ),
                    position: None,
                });
            }
            let y = cast(y, &DataType::Float64)?;
            let y: Array1<f64> = y.as_primitive::<datafusion::arrow::datatypes::Float64Type>().values().to_vec().into();
            let fitted = linfa_linear::LinearRegression::new()
                .fit(&Dataset::new(data.x.clone(), y))
                .map_err(|e| failed(e.to_string()))?;
            Trained::LinearRegression { coefficients: fitted.params().to_vec(), intercept: fitted.intercept() }
        }
        "logistic_regression" | "decision_tree" => {
            let (classes, targets) = class_targets(&name, data)?;
            let positive = match params.get("positive") {
                None => classes.len() - 1,
                Some(text) => classes.iter().position(|c| label_text(c) == *text).ok_or_else(|| {
                    plan_error(
                        "22023",
                        format!(
                            "model \"{name}\": positive = '{text}' is not one of the labels ({})",
                            classes.iter().map(label_text).collect::<Vec<_>>().join(", ")
                        ),
                    )
                })?,
            };
            if algorithm == "logistic_regression" {
                if classes.len() != 2 {
                    return Err(plan_error(
                        "22023",
                        format!(
                            "model \"{name}\": logistic_regression needs exactly two label values; the training rows have {}",
                            classes.len()
                        ),
                    ));
                }
                // Class 1 is the positive one; linfa picks its own, so orient the weights.
                let binary: Array1<usize> = targets.iter().map(|t| usize::from(*t == positive)).collect();
                let fitted = linfa_logistic::LogisticRegression::default()
                    .alpha(float_param("alpha", 1.0)?)
                    .max_iterations(int_param("max_iter", 100)?)
                    .fit(&Dataset::new(data.x.clone(), binary))
                    .map_err(|e| failed(e.to_string()))?;
                let sign = if fitted.labels().pos.class == 1 { 1.0 } else { -1.0 };
                let negative = 1 - positive;
                Trained::LogisticRegression {
                    coefficients: fitted.params().iter().map(|w| sign * w).collect(),
                    intercept: sign * fitted.intercept(),
                    classes: vec![classes[negative].clone(), classes[positive].clone()],
                }
            } else {
                let targets: Array1<usize> = targets.into();
                let fitted = linfa_trees::DecisionTree::params()
                    .max_depth(Some(int_param("max_depth", 10)? as usize))
                    .fit(&Dataset::new(data.x.clone(), targets.clone()))
                    .map_err(|e| failed(e.to_string()))?;
                let nodes = flatten_tree(&fitted, &data.x, &targets, classes.len(), positive);
                Trained::DecisionTree { nodes, classes, positive }
            }
        }
        other => return Err(plan_error("22023", format!("model \"{name}\": unknown algorithm \"{other}\""))),
    };
    let mut model = Model {
        format: FORMAT.into(),
        format_version: FORMAT_VERSION,
        name: provenance.name,
        version: provenance.version,
        params: params.clone(),
        features: data.features.clone(),
        label: data.label.clone(),
        training_query: provenance.training_query,
        training_rows: rows as u64,
        metrics: BTreeMap::new(),
        created_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        retrain_every: provenance.retrain_every,
        trained,
    };
    model.metrics = metrics(&model, data)?;
    tracing::info!(
        model = %name,
        algorithm,
        rows,
        seconds = started.elapsed().as_secs_f64(),
        metrics = ?model.metrics,
        "training finished"
    );
    Ok(model)
}

fn rows_of(matrix: &Array2<f64>) -> Vec<Vec<f64>> {
    matrix.outer_iter().map(|row| row.to_vec()).collect()
}

fn label_text(label: &Label) -> String {
    match label {
        Label::Bool(b) => b.to_string(),
        Label::Int(i) => i.to_string(),
        Label::Text(s) => s.clone(),
    }
}

/// The distinct labels in order, and each row's label as an index into them.
fn class_targets(name: &str, data: &TrainingSet) -> Result<(Vec<Label>, Vec<usize>)> {
    let y = data.y.as_ref().ok_or_else(|| Error::Internal("classifier without a label".into()))?;
    let labels: Vec<Label> = match y.data_type() {
        DataType::Boolean => y.as_boolean().iter().map(|v| Label::Bool(v.unwrap_or_default())).collect(),
        t if t.is_integer() => {
            let ints = cast(y, &DataType::Int64)?;
            ints.as_primitive::<Int64Type>().values().iter().map(|v| Label::Int(*v)).collect()
        }
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => {
            let text = cast(y, &DataType::Utf8)?;
            text.as_string::<i32>().iter().map(|v| Label::Text(v.unwrap_or_default().to_string())).collect()
        }
        other => {
            return Err(Error::TypeMismatch {
                message: format!(
                    "model \"{name}\": the label \"{}\" is {}; class labels are boolean, integer or text",
                    data.label.as_ref().map(|l| l.name.as_str()).unwrap_or_default(),
                    sql_type(other)
                ),
                position: None,
            });
        }
    };
    let mut classes = labels.clone();
    classes.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    classes.dedup();
    if classes.len() < 2 {
        return Err(plan_error(
            "22023",
            format!("model \"{name}\": every training row has the same label; a classifier needs at least two"),
        ));
    }
    let targets = labels.iter().map(|l| classes.iter().position(|c| c == l).unwrap_or(0)).collect();
    Ok((classes, targets))
}

/// The fitted tree as freshet's flat node list; each leaf's class distribution is counted
/// from the training rows that reach it.
fn flatten_tree(
    tree: &linfa_trees::DecisionTree<f64, usize>,
    x: &Array2<f64>,
    y: &Array1<usize>,
    classes: usize,
    positive: usize,
) -> Vec<TreeNode> {
    fn walk(node: &linfa_trees::TreeNode<f64, usize>, nodes: &mut Vec<TreeNode>) -> usize {
        let at = nodes.len();
        if node.is_leaf() {
            nodes.push(TreeNode::Leaf { class: node.prediction().unwrap_or(0), probability: 0.0 });
            return at;
        }
        let (feature, threshold, _) = node.split();
        nodes.push(TreeNode::Split { feature, threshold, left: 0, right: 0 });
        let children = node.children();
        let left = match children.first().and_then(|c| c.as_ref()) {
            Some(child) => walk(child, nodes),
            None => 0,
        };
        let right = match children.get(1).and_then(|c| c.as_ref()) {
            Some(child) => walk(child, nodes),
            None => 0,
        };
        nodes[at] = TreeNode::Split { feature, threshold, left, right };
        at
    }
    let mut nodes = Vec::new();
    walk(tree.root_node(), &mut nodes);
    let mut counts = vec![vec![0usize; classes]; nodes.len()];
    for (row, label) in x.outer_iter().zip(y.iter()) {
        let mut at = 0;
        while let TreeNode::Split { feature, threshold, left, right } = &nodes[at] {
            at = if row[*feature] < *threshold { *left } else { *right };
        }
        counts[at][*label] += 1;
    }
    for (node, count) in nodes.iter_mut().zip(counts) {
        if let TreeNode::Leaf { class, probability } = node {
            let total: usize = count.iter().sum();
            *probability = if total == 0 { 0.0 } else { count[positive] as f64 / total as f64 };
            if total > 0 {
                *class = (0..classes).max_by_key(|c| (count[*c], usize::MAX - c)).unwrap_or(*class);
            }
        }
    }
    nodes
}

/// Training metrics, computed by scoring the training rows with the served kernels.
fn metrics(model: &Model, data: &TrainingSet) -> Result<BTreeMap<String, f64>> {
    let scorer = Scorer::new(model.clone())?;
    let columns: Vec<Vec<f64>> = data.x.columns().into_iter().map(|c| c.to_vec()).collect();
    let slices: Vec<&[f64]> = columns.iter().map(|c| c.as_slice()).collect();
    let n = data.x.nrows();
    let scores = scorer.score(&slices, None, n);
    let scores = scores.values();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let mut out = BTreeMap::new();
    match &model.trained {
        Trained::Kmeans { .. } => {
            out.insert("inertia".into(), scores.iter().map(|d| d * d).sum());
            out.insert("mean_score".into(), mean(scores));
        }
        Trained::GaussianMixture { .. } => {
            out.insert("mean_negative_log_likelihood".into(), mean(scores));
        }
        Trained::Zscore { .. } => {
            out.insert("mean_score".into(), mean(scores));
            out.insert("max_score".into(), scores.iter().cloned().fold(0.0, f64::max));
        }
        Trained::LinearRegression { .. } => {
            let y = data.y.as_ref().map(|y| cast(y, &DataType::Float64)).transpose()?;
            if let Some(y) = y {
                let y = y.as_primitive::<datafusion::arrow::datatypes::Float64Type>().values();
                let y_mean = mean(y);
                let ss_res: f64 = y.iter().zip(scores.iter()).map(|(a, p)| (a - p) * (a - p)).sum();
                let ss_tot: f64 = y.iter().map(|a| (a - y_mean) * (a - y_mean)).sum();
                out.insert("rmse".into(), (ss_res / n as f64).sqrt());
                out.insert("r2".into(), if ss_tot > 0.0 { 1.0 - ss_res / ss_tot } else { 1.0 });
            }
        }
        Trained::LogisticRegression { .. } | Trained::DecisionTree { .. } => {
            let predicted = scorer.predict(&slices, None, n)?;
            let truth = data.y.as_ref().ok_or_else(|| Error::Internal("classifier without a label".into()))?;
            let truth = cast(truth, predicted.data_type())?;
            let equal = datafusion::arrow::compute::kernels::cmp::eq(&predicted, &truth)?;
            out.insert("accuracy".into(), equal.true_count() as f64 / n as f64);
        }
    }
    Ok(out)
}
