//! Models: training with linfa, the versioned model registry, and the scoring functions.
//!
//! - [`model`]: a trained model as freshet stores it — metadata plus the fitted parameters,
//!   in freshet's own JSON format (documented on [`model::Model`]) — and the vectorised
//!   kernels that score Arrow arrays with it.
//! - [`train`]: turns the rows of a batch query into a model, with linfa (kmeans,
//!   gaussian_mixture, logistic_regression, linear_regression, decision_tree) or by hand
//!   (zscore). Training is CPU-bound: callers run it on a blocking thread.
//! - [`registry`]: every model's versions, the active one, and when each version took
//!   effect for running views (by barrier epoch), so a hot swap happens at one barrier for
//!   every operator of a view.
//! - [`udf`]: `score(model, f1, …)`, `predict(model, f1, …)` and `score_version(model)` as
//!   DataFusion scalar functions over whole Arrow arrays: one registry lookup per batch,
//!   never per row.
//! - [`epoch`]: the barrier the current dataflow task last passed, set by the dataflow
//!   runtime and read by the scoring functions.
//!
//! This module knows nothing about the catalog, the log or the server: the catalog decides
//! when a version is stored and activated, and tells the registry.

pub mod epoch;
pub mod model;
pub mod registry;
pub mod train;
pub mod udf;

pub use model::Model;
pub use registry::ModelRegistry;
