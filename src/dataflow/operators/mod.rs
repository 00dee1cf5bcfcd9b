//! The incremental operators. Each keeps its output equal to the change in its query's
//! answer; see each type's docs for how it treats weights.

pub mod aggregate;
pub mod event_time;
pub mod join;
pub mod materialize;
pub mod project;
pub mod session;
pub mod temporal;
pub mod topn;
pub mod union;

pub use aggregate::{AggregateFunction, AggregateOperator, AggregateSpec};
pub use event_time::{EmitOnCloseOperator, EventTimeOperator, LateCounter};
pub use join::{JoinKind, JoinOperator};
pub use materialize::{EpochSink, MaterializeOperator};
pub use project::ProjectFilterOperator;
pub use session::SessionOperator;
pub use temporal::TemporalFilterOperator;
pub use topn::{TopNOperator, TopNSpec};
pub use union::{MergeOperator, UnionOperator};
