//! A trained model: what freshet stores, and the kernels that score with it.
//!
//! # The model format (JSON, `format_version` 1)
//!
//! One JSON object per model version, stored at `models/<name>/v<N>.json` under the data
//! directory and written by `COPY MODEL … TO 'file'`:
//!
//! ```json
//! {
//!   "format": "freshet-model", "format_version": 1,
//!   "name": "normal_ops", "version": 2,
//!   "params": {"k": "4", "seed": "0"},
//!   "features": [{"name": "temperature", "type": "double precision"}, …],
//!   "label": null,
//!   "training_query": "SELECT temperature, vibration FROM history",
//!   "training_rows": 60000,
//!   "metrics": {"inertia": 1234.5, "mean_score": 0.41},
//!   "created_at": "2026-11-26T21:04:05Z",
//!   "retrain_every": "1 hour",
//!   "trained": {"algorithm": "kmeans", "centroids": [[20.1, 0.5], …]}
//! }
//! ```
//!
//! `trained` holds the fitted parameters, by `algorithm`:
//!
//! | algorithm | fields | `score` | `predict` |
//! |---|---|---|---|
//! | `kmeans` | `centroids` (k × features) | Euclidean distance to the nearest centroid | index of that centroid |
//! | `gaussian_mixture` | `weights`, `means`, `covariances` (full) | negative log-likelihood | most likely component |
//! | `zscore` | `means`, `std_devs` (sample) | max over features of \|x − mean\| / std_dev | (not defined) |
//! | `linear_regression` | `coefficients`, `intercept` | the prediction | the prediction |
//! | `logistic_regression` | `coefficients`, `intercept`, `classes` [negative, positive] | P(positive) = σ(x·w + b) | the more likely class |
//! | `decision_tree` | `nodes`, `classes`, `positive` | P(positive) in the row's leaf | the leaf's majority class |
//!
//! Decision tree nodes are a flat list, root first: a split `{"feature": i, "threshold": t,
//! "left": n, "right": m}` sends rows with `x[i] < t` to node `n`, others to `m`; a leaf is
//! `{"class": c, "probability": p}` (class index into `classes`, probability of the positive
//! class). Class labels are JSON strings, numbers or booleans, as the label column was.

use std::collections::BTreeMap;
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, BooleanArray, Float64Array, Int64Array, StringArray, UInt32Array};
use datafusion::arrow::buffer::{BooleanBuffer, NullBuffer};
use datafusion::arrow::datatypes::DataType;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The value of `format` in every model file.
pub const FORMAT: &str = "freshet-model";
/// The version of the format this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// A feature or label column: its name and SQL type.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Column {
    pub name: String,
    #[serde(rename = "type")]
    pub sql_type: String,
}

/// One version of a model, with everything needed to score and to explain it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Model {
    pub format: String,
    pub format_version: u32,
    pub name: String,
    pub version: u32,
    /// The parameters the model was trained with (`k`, `seed`, `impute`, …), as given.
    pub params: BTreeMap<String, String>,
    pub features: Vec<Column>,
    pub label: Option<Column>,
    /// The query it was trained on; `None` for a model imported without one.
    pub training_query: Option<String>,
    pub training_rows: u64,
    /// Training metrics (inertia, accuracy, r2, …) computed on the training rows.
    pub metrics: BTreeMap<String, f64>,
    /// RFC 3339, UTC.
    pub created_at: String,
    /// Scheduled retraining interval, as written in `WITH (retrain_every = …)`.
    pub retrain_every: Option<String>,
    pub trained: Trained,
}

/// A class label as stored: what the label column held.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, PartialOrd)]
#[serde(untagged)]
pub enum Label {
    Bool(bool),
    Int(i64),
    Text(String),
}

/// A decision tree node (see the module docs).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum TreeNode {
    Split { feature: usize, threshold: f64, left: usize, right: usize },
    Leaf { class: usize, probability: f64 },
}

/// The fitted parameters of each algorithm.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "algorithm", rename_all = "snake_case")]
pub enum Trained {
    Kmeans { centroids: Vec<Vec<f64>> },
    GaussianMixture { weights: Vec<f64>, means: Vec<Vec<f64>>, covariances: Vec<Vec<Vec<f64>>> },
    Zscore { means: Vec<f64>, std_devs: Vec<f64> },
    LinearRegression { coefficients: Vec<f64>, intercept: f64 },
    LogisticRegression { coefficients: Vec<f64>, intercept: f64, classes: Vec<Label> },
    DecisionTree { nodes: Vec<TreeNode>, classes: Vec<Label>, positive: usize },
}

impl Trained {
    /// The algorithm's SQL name.
    pub fn algorithm(&self) -> &'static str {
        match self {
            Trained::Kmeans { .. } => "kmeans",
            Trained::GaussianMixture { .. } => "gaussian_mixture",
            Trained::Zscore { .. } => "zscore",
            Trained::LinearRegression { .. } => "linear_regression",
            Trained::LogisticRegression { .. } => "logistic_regression",
            Trained::DecisionTree { .. } => "decision_tree",
        }
    }
}

impl Model {
    /// The model as freshet's JSON format.
    pub fn to_json(&self) -> Result<Vec<u8>> {
        serde_json::to_vec_pretty(self).map_err(|e| Error::Internal(format!("encoding model \"{}\": {e}", self.name)))
    }

    /// Reads freshet's JSON format; `location` names the file in errors.
    pub fn from_json(bytes: &[u8], location: &str) -> Result<Model> {
        let model: Model = serde_json::from_slice(bytes).map_err(|e| Error::Plan {
            code: "22P02",
            message: format!("{location} is not a freshet model file: {e}"),
            position: None,
        })?;
        if model.format != FORMAT || model.format_version != FORMAT_VERSION {
            return Err(Error::Plan {
                code: "22P02",
                message: format!(
                    "{location} is format \"{}\" version {}; this freshet reads \"{FORMAT}\" version {FORMAT_VERSION}",
                    model.format, model.format_version
                ),
                position: None,
            });
        }
        Ok(model)
    }

    /// The Arrow type `predict` returns for this model, or why it has none.
    pub fn predict_type(&self) -> std::result::Result<DataType, String> {
        match &self.trained {
            Trained::Kmeans { .. } | Trained::GaussianMixture { .. } => Ok(DataType::Int64),
            Trained::LinearRegression { .. } => Ok(DataType::Float64),
            Trained::LogisticRegression { classes, .. } | Trained::DecisionTree { classes, .. } => {
                Ok(label_type(classes))
            }
            Trained::Zscore { .. } => {
                Err("predict() is not defined for zscore models (they have no classes); use score()".into())
            }
        }
    }

    /// The names and types of the features, as "name type, …", for messages.
    pub fn feature_list(&self) -> String {
        self.features.iter().map(|f| format!("{} {}", f.name, f.sql_type)).collect::<Vec<_>>().join(", ")
    }
}

fn label_type(classes: &[Label]) -> DataType {
    match classes.first() {
        Some(Label::Bool(_)) => DataType::Boolean,
        Some(Label::Int(_)) => DataType::Int64,
        _ => DataType::Utf8,
    }
}

/// A model ready to score: the stored model plus what scoring precomputes from it.
#[derive(Debug)]
pub struct Scorer {
    pub model: Model,
    kernel: Kernel,
    /// `predict` output per class index, for classifiers.
    classes: Option<ArrayRef>,
}

#[derive(Debug)]
enum Kernel {
    Kmeans { centroids: Vec<Vec<f64>> },
    Gaussian { components: Vec<Component> },
    Zscore { means: Vec<f64>, inv_std: Vec<f64> },
    Linear { coefficients: Vec<f64>, intercept: f64 },
    Logistic { coefficients: Vec<f64>, intercept: f64 },
    Tree { nodes: Vec<TreeNode> },
}

/// One Gaussian: log(weight) − ½(d·ln 2π + ln|Σ|), the mean, and the lower Cholesky factor of Σ.
#[derive(Debug)]
struct Component {
    log_norm: f64,
    mean: Vec<f64>,
    cholesky: Vec<Vec<f64>>,
}

/// Rows scored per inner block: small enough for the accumulators to stay in L1.
const BLOCK: usize = 512;

impl Scorer {
    /// Checks the model's parameters fit together and precomputes what scoring needs.
    pub fn new(model: Model) -> Result<Scorer> {
        let d = model.features.len();
        let bad = |what: String| Error::Plan {
            code: "22P02",
            message: format!("model \"{}\" version {} is inconsistent: {what}", model.name, model.version),
            position: None,
        };
        if d == 0 {
            return Err(bad("it has no features".into()));
        }
        let check_len = |name: &str, len: usize| {
            if len == d { Ok(()) } else { Err(bad(format!("{name} has {len} values for {d} features"))) }
        };
        let kernel = match &model.trained {
            Trained::Kmeans { centroids } => {
                if centroids.is_empty() {
                    return Err(bad("no centroids".into()));
                }
                for c in centroids {
                    check_len("a centroid", c.len())?;
                }
                Kernel::Kmeans { centroids: centroids.clone() }
            }
            Trained::GaussianMixture { weights, means, covariances } => {
                if weights.is_empty() || weights.len() != means.len() || weights.len() != covariances.len() {
                    return Err(bad("weights, means and covariances differ in number".into()));
                }
                let mut components = Vec::new();
                for ((w, mean), cov) in weights.iter().zip(means).zip(covariances) {
                    check_len("a mean", mean.len())?;
                    if cov.len() != d || cov.iter().any(|row| row.len() != d) {
                        return Err(bad(format!("a covariance is not {d} × {d}")));
                    }
                    let cholesky = cholesky(cov).ok_or_else(|| bad("a covariance is not positive definite".into()))?;
                    let log_det: f64 = cholesky.iter().enumerate().map(|(i, row)| 2.0 * row[i].ln()).sum();
                    let log_norm = w.ln() - 0.5 * (d as f64 * (2.0 * std::f64::consts::PI).ln() + log_det);
                    components.push(Component { log_norm, mean: mean.clone(), cholesky });
                }
                Kernel::Gaussian { components }
            }
            Trained::Zscore { means, std_devs } => {
                check_len("means", means.len())?;
                check_len("std_devs", std_devs.len())?;
                if std_devs.iter().any(|s| s.is_nan() || *s <= 0.0) {
                    return Err(bad("a standard deviation is not positive".into()));
                }
                Kernel::Zscore { means: means.clone(), inv_std: std_devs.iter().map(|s| 1.0 / s).collect() }
            }
            Trained::LinearRegression { coefficients, intercept } => {
                check_len("coefficients", coefficients.len())?;
                Kernel::Linear { coefficients: coefficients.clone(), intercept: *intercept }
            }
            Trained::LogisticRegression { coefficients, intercept, classes } => {
                check_len("coefficients", coefficients.len())?;
                if classes.len() != 2 {
                    return Err(bad(format!("{} classes; logistic regression has two", classes.len())));
                }
                Kernel::Logistic { coefficients: coefficients.clone(), intercept: *intercept }
            }
            Trained::DecisionTree { nodes, classes, positive } => {
                if nodes.is_empty() || *positive >= classes.len() {
                    return Err(bad("an empty tree or a positive class out of range".into()));
                }
                for node in nodes {
                    match node {
                        TreeNode::Split { feature, left, right, .. } => {
                            if *feature >= d || *left >= nodes.len() || *right >= nodes.len() {
                                return Err(bad("a split points outside the tree or the features".into()));
                            }
                        }
                        TreeNode::Leaf { class, .. } => {
                            if *class >= classes.len() {
                                return Err(bad("a leaf's class is out of range".into()));
                            }
                        }
                    }
                }
                check_acyclic(nodes).map_err(bad)?;
                Kernel::Tree { nodes: nodes.clone() }
            }
        };
        let classes = match &model.trained {
            Trained::LogisticRegression { classes, .. } | Trained::DecisionTree { classes, .. } => {
                Some(class_array(classes).map_err(bad)?)
            }
            _ => None,
        };
        Ok(Scorer { model, kernel, classes })
    }

    /// Scores `n` rows given one `f64` slice per feature. `valid` is the rows whose
    /// features are all present and not NaN; the others score NULL.
    pub fn score(&self, features: &[&[f64]], valid: Option<&NullBuffer>, n: usize) -> Float64Array {
        let mut out = vec![0.0f64; n];
        match &self.kernel {
            Kernel::Kmeans { centroids } => {
                nearest_centroids(centroids, features, n, |start, len, distances, _| {
                    for (o, d) in out[start..start + len].iter_mut().zip(&distances[..len]) {
                        *o = d.sqrt();
                    }
                });
            }
            Kernel::Gaussian { components } => {
                let mut log_probs = vec![0.0; components.len()];
                for (i, o) in out.iter_mut().enumerate() {
                    gaussian_log_probs(components, features, i, &mut log_probs);
                    *o = -log_sum_exp(&log_probs);
                }
            }
            Kernel::Zscore { means, inv_std } => {
                for (f, column) in features.iter().enumerate() {
                    let (m, s) = (means[f], inv_std[f]);
                    for (o, x) in out.iter_mut().zip(column.iter()) {
                        *o = o.max((x - m).abs() * s);
                    }
                }
            }
            Kernel::Linear { coefficients, intercept } => linear(coefficients, *intercept, features, &mut out),
            Kernel::Logistic { coefficients, intercept } => {
                linear(coefficients, *intercept, features, &mut out);
                for o in out.iter_mut() {
                    *o = 1.0 / (1.0 + (-*o).exp());
                }
            }
            Kernel::Tree { nodes } => {
                for (i, o) in out.iter_mut().enumerate() {
                    if let TreeNode::Leaf { probability, .. } = &nodes[leaf(nodes, features, i)] {
                        *o = *probability;
                    }
                }
            }
        }
        Float64Array::new(out.into(), valid.cloned())
    }

    /// What `predict` returns for `n` rows (see [`Model::predict_type`]).
    pub fn predict(&self, features: &[&[f64]], valid: Option<&NullBuffer>, n: usize) -> Result<ArrayRef> {
        let indices = |ids: Vec<u32>| UInt32Array::new(ids.into(), valid.cloned());
        Ok(match &self.kernel {
            Kernel::Kmeans { centroids } => {
                let mut ids = vec![0i64; n];
                nearest_centroids(centroids, features, n, |start, len, _, best| {
                    for (o, b) in ids[start..start + len].iter_mut().zip(&best[..len]) {
                        *o = *b as i64;
                    }
                });
                Arc::new(Int64Array::new(ids.into(), valid.cloned()))
            }
            Kernel::Gaussian { components } => {
                let mut log_probs = vec![0.0; components.len()];
                let ids: Vec<i64> = (0..n)
                    .map(|i| {
                        gaussian_log_probs(components, features, i, &mut log_probs);
                        argmax(&log_probs) as i64
                    })
                    .collect();
                Arc::new(Int64Array::new(ids.into(), valid.cloned()))
            }
            Kernel::Linear { .. } => Arc::new(self.score(features, valid, n)),
            Kernel::Logistic { .. } => {
                let p = self.score(features, valid, n);
                let ids: Vec<u32> = p.values().iter().map(|p| u32::from(*p >= 0.5)).collect();
                self.take_classes(&indices(ids))?
            }
            Kernel::Tree { nodes } => {
                let ids: Vec<u32> = (0..n)
                    .map(|i| match &nodes[leaf(nodes, features, i)] {
                        TreeNode::Leaf { class, .. } => *class as u32,
                        TreeNode::Split { .. } => 0,
                    })
                    .collect();
                self.take_classes(&indices(ids))?
            }
            Kernel::Zscore { .. } => {
                return Err(Error::Plan {
                    code: "42883",
                    message: format!(
                        "model \"{}\": predict() is not defined for zscore models; use score()",
                        self.model.name
                    ),
                    position: None,
                });
            }
        })
    }

    fn take_classes(&self, ids: &UInt32Array) -> Result<ArrayRef> {
        let classes = self.classes.as_ref().ok_or_else(|| Error::Internal("a classifier without classes".into()))?;
        Ok(datafusion::arrow::compute::take(classes.as_ref(), ids, None)?)
    }
}

/// Runs `emit(start, len, squared_distances, nearest)` for each block of rows: the squared
/// distance to the nearest centroid and its index. Columnar: for each centroid, one pass
/// per feature over the block, which the compiler vectorises.
fn nearest_centroids<F>(centroids: &[Vec<f64>], features: &[&[f64]], n: usize, mut emit: F)
where
    F: FnMut(usize, usize, &[f64; BLOCK], &[u32; BLOCK]),
{
    let mut best = [0.0f64; BLOCK];
    let mut nearest = [0u32; BLOCK];
    let mut acc = [0.0f64; BLOCK];
    let mut start = 0;
    while start < n {
        let len = BLOCK.min(n - start);
        best[..len].fill(f64::INFINITY);
        for (c, centroid) in centroids.iter().enumerate() {
            acc[..len].fill(0.0);
            for (column, center) in features.iter().zip(centroid) {
                for (a, x) in acc[..len].iter_mut().zip(&column[start..start + len]) {
                    let d = x - center;
                    *a += d * d;
                }
            }
            for i in 0..len {
                if acc[i] < best[i] {
                    best[i] = acc[i];
                    nearest[i] = c as u32;
                }
            }
        }
        emit(start, len, &best, &nearest);
        start += len;
    }
}

fn linear(coefficients: &[f64], intercept: f64, features: &[&[f64]], out: &mut [f64]) {
    out.fill(intercept);
    for (column, w) in features.iter().zip(coefficients) {
        for (o, x) in out.iter_mut().zip(column.iter()) {
            *o += w * x;
        }
    }
}

fn gaussian_log_probs(components: &[Component], features: &[&[f64]], row: usize, out: &mut [f64]) {
    let d = features.len();
    let mut z = [0.0f64; 16];
    let mut z_heap = Vec::new();
    let z: &mut [f64] = if d <= 16 {
        &mut z[..d]
    } else {
        z_heap.resize(d, 0.0);
        &mut z_heap
    };
    for (component, o) in components.iter().zip(out.iter_mut()) {
        // Solve L z = x − μ; the Mahalanobis distance is |z|².
        let mut mahalanobis = 0.0;
        for i in 0..d {
            let mut v = features[i][row] - component.mean[i];
            let row_of_l = &component.cholesky[i];
            v -= row_of_l[..i].iter().zip(&z[..i]).map(|(l, z)| l * z).sum::<f64>();
            z[i] = v / component.cholesky[i][i];
            mahalanobis += z[i] * z[i];
        }
        *o = component.log_norm - 0.5 * mahalanobis;
    }
}

fn log_sum_exp(values: &[f64]) -> f64 {
    let max = values.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    if !max.is_finite() {
        return max;
    }
    max + values.iter().map(|v| (v - max).exp()).sum::<f64>().ln()
}

fn argmax(values: &[f64]) -> usize {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best
}

/// The leaf a row falls into.
fn leaf(nodes: &[TreeNode], features: &[&[f64]], row: usize) -> usize {
    let mut at = 0;
    // Bounded by the node count: `check_acyclic` guarantees every path ends in a leaf.
    for _ in 0..nodes.len() {
        match &nodes[at] {
            TreeNode::Leaf { .. } => return at,
            TreeNode::Split { feature, threshold, left, right } => {
                at = if features[*feature][row] < *threshold { *left } else { *right };
            }
        }
    }
    at
}

/// Every path from the root reaches a leaf without revisiting a node.
fn check_acyclic(nodes: &[TreeNode]) -> std::result::Result<(), String> {
    let mut seen = vec![false; nodes.len()];
    let mut stack = vec![0usize];
    while let Some(at) = stack.pop() {
        if std::mem::replace(&mut seen[at], true) {
            return Err("a tree node is reached twice".into());
        }
        if let TreeNode::Split { left, right, .. } = &nodes[at] {
            stack.push(*left);
            stack.push(*right);
        }
    }
    Ok(())
}

/// Lower Cholesky factor of a symmetric positive definite matrix.
fn cholesky(a: &[Vec<f64>]) -> Option<Vec<Vec<f64>>> {
    let d = a.len();
    let mut l = vec![vec![0.0; d]; d];
    for i in 0..d {
        for j in 0..=i {
            let sum = a[i][j] - l[i][..j].iter().zip(&l[j][..j]).map(|(x, y)| x * y).sum::<f64>();
            if i == j {
                // Also refuses NaN.
                if sum.is_nan() || sum <= 0.0 {
                    return None;
                }
                l[i][i] = sum.sqrt();
            } else {
                l[i][j] = sum / l[j][j];
            }
        }
    }
    Some(l)
}

fn class_array(classes: &[Label]) -> std::result::Result<ArrayRef, String> {
    Ok(match label_type(classes) {
        DataType::Boolean => Arc::new(BooleanArray::from(
            classes
                .iter()
                .map(|c| match c {
                    Label::Bool(b) => Ok(*b),
                    _ => Err("class labels of mixed types".to_string()),
                })
                .collect::<std::result::Result<Vec<_>, _>>()?,
        )),
        DataType::Int64 => Arc::new(Int64Array::from(
            classes
                .iter()
                .map(|c| match c {
                    Label::Int(i) => Ok(*i),
                    _ => Err("class labels of mixed types".to_string()),
                })
                .collect::<std::result::Result<Vec<_>, _>>()?,
        )),
        _ => Arc::new(StringArray::from(
            classes
                .iter()
                .map(|c| match c {
                    Label::Text(s) => Ok(s.clone()),
                    _ => Err("class labels of mixed types".to_string()),
                })
                .collect::<std::result::Result<Vec<_>, _>>()?,
        )),
    })
}

/// The rows whose features are all present and not NaN, as a validity buffer (`None`:
/// all valid), and how many are not.
pub fn valid_rows(features: &[&Float64Array], n: usize) -> (Option<NullBuffer>, usize) {
    let mut nulls: Option<NullBuffer> = None;
    for column in features {
        nulls = NullBuffer::union(nulls.as_ref(), column.nulls());
    }
    let has_nan = features.iter().any(|c| c.values().iter().any(|v| v.is_nan()));
    if has_nan {
        let not_nan = BooleanBuffer::collect_bool(n, |i| features.iter().all(|c| !c.values()[i].is_nan()));
        nulls = NullBuffer::union(nulls.as_ref(), Some(&NullBuffer::new(not_nan)));
    }
    let invalid = nulls.as_ref().map_or(0, |b| b.null_count());
    (nulls, invalid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(trained: Trained, features: usize) -> Scorer {
        let model = Model {
            format: FORMAT.into(),
            format_version: FORMAT_VERSION,
            name: "m".into(),
            version: 1,
            params: BTreeMap::new(),
            features: (0..features)
                .map(|i| Column { name: format!("f{i}"), sql_type: "double precision".into() })
                .collect(),
            label: None,
            training_query: None,
            training_rows: 0,
            metrics: BTreeMap::new(),
            created_at: String::new(),
            retrain_every: None,
            trained,
        };
        Scorer::new(model).expect("valid model")
    }

    #[test]
    fn kmeans_scores_distance_to_nearest_centroid() {
        let m = model(Trained::Kmeans { centroids: vec![vec![0.0, 0.0], vec![10.0, 10.0]] }, 2);
        let x = [3.0, 10.0, 9.0];
        let y = [4.0, 10.0, 10.0];
        let scores = m.score(&[&x, &y], None, 3);
        assert_eq!(scores.values().as_ref(), &[5.0, 0.0, 1.0]);
        let ids = m.predict(&[&x, &y], None, 3).expect("predicts");
        let ids = ids.as_any().downcast_ref::<Int64Array>().expect("int64");
        assert_eq!(ids.values().as_ref(), &[0, 1, 1]);
    }

    #[test]
    fn gaussian_nll_matches_the_closed_form() {
        // One standard normal in 2-D: NLL(x) = ln(2π) + |x|²/2.
        let m = model(
            Trained::GaussianMixture {
                weights: vec![1.0],
                means: vec![vec![0.0, 0.0]],
                covariances: vec![vec![vec![1.0, 0.0], vec![0.0, 1.0]]],
            },
            2,
        );
        let scores = m.score(&[&[1.0], &[2.0]], None, 1);
        let expected = (2.0 * std::f64::consts::PI).ln() + 2.5;
        assert!((scores.value(0) - expected).abs() < 1e-12);
    }

    #[test]
    fn nan_and_null_features_score_null() {
        let a = Float64Array::from(vec![Some(1.0), None, Some(f64::NAN)]);
        let (valid, invalid) = valid_rows(&[&a], 3);
        assert_eq!(invalid, 2);
        let m = model(Trained::Zscore { means: vec![0.0], std_devs: vec![2.0] }, 1);
        let scores = m.score(&[a.values()], valid.as_ref(), 3);
        assert_eq!(scores.null_count(), 2);
        assert_eq!(scores.value(0), 0.5);
    }

    #[test]
    fn model_files_round_trip_and_reject_foreign_json() {
        let m = model(Trained::Kmeans { centroids: vec![vec![1.0]] }, 1);
        let bytes = m.model.to_json().expect("encodes");
        let back = Model::from_json(&bytes, "test").expect("decodes");
        assert_eq!(back.features, m.model.features);
        let err = Model::from_json(b"{\"a\": 1}", "x.json").expect_err("not a model");
        assert!(err.to_string().contains("x.json is not a freshet model file"), "{err}");
    }
}
