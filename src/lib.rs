//! freshet: a SQL streaming database. Sources, tables, materialized views, sinks and
//! models are declared in SQL; views are kept fresh incrementally over Arrow change
//! batches and served over the Postgres wire protocol.
//!
//! # Layout
//!
//! Dependencies point down this list; nothing lower imports anything higher.
//!
//! - [`error`]: the one error enum, its `Result` alias, and the SQLSTATE of each cause.
//! - [`state`]: durable storage over `object_store`: the write-ahead log, snapshots and
//!   checkpoint objects; operator state spilled to local RocksDB stores.
//! - [`dataflow`]: change batches (rows with +1/−1 weights), the operator trait, the task
//!   runtime that aligns barriers, and the incremental operators.
//! - [`ml`]: models: training with linfa, the versioned registry, and the `score()`,
//!   `predict()` and `score_version()` functions.
//! - [`sql`]: parsing (Postgres dialect), planning statements with DataFusion, and
//!   lowering a view's plan to a dataflow.
//! - [`connectors`]: where sources' rows come from (generators, HTTP posts, files).
//! - [`catalog`]: sources, tables, materialized views, and the [`catalog::Database`] that
//!   runs planned statements; `catalog::system` is the `pg_catalog`/`information_schema`
//!   that clients introspect.
//! - [`server`]: the Postgres wire protocol (pgwire) with per-connection sessions
//!   (`server::session`) and authentication/TLS (`server::auth`), the HTTP endpoints, and
//!   startup.

pub mod catalog;
pub mod connectors;
pub mod dataflow;
pub mod error;
pub mod ml;
pub mod server;
pub mod sql;
pub mod state;

pub use error::{Error, Result};
