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

/// Tells the allocator (mimalloc, which the `freshet` binary and the benches use) to keep
/// the memory it frees for reuse rather than hand it back to the operating system soon
/// after. Operators free and allocate large buffers every epoch and every checkpoint; given
/// back, each reuse faults the pages in again and the kernel zeroes them, which cost a fifth
/// of nexmark q7's CPU on this project's machine. Resident memory therefore stays
/// near its peak. `MIMALLOC_PURGE_DELAY` in the environment (milliseconds; mimalloc's
/// default is 10) takes precedence. Call it first in `main`, before other threads start.
pub fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // `mi_option_purge_delay` in mimalloc.h (the same in mimalloc 2 and 3); -1: never.
    const PURGE_DELAY: std::ffi::c_int = 15;
    unsafe extern "C" {
        fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
    }
    // SAFETY: sets an integer option of the linked mimalloc; called before threads start.
    unsafe { mi_option_set(PURGE_DELAY, -1) }
}
