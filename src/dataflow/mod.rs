//! The incremental dataflow: change batches and (as the engine grows) the operator trait,
//! barriers, watermarks and the graph runtime.
//!
//! [`ChangeBatch`] is the unit every change travels in: table writes are logged and applied
//! as change batches, and every operator consumes and produces them. [`operator`] defines
//! the messages and the [`Operator`] trait, [`runtime`] runs operators as tasks and aligns
//! barriers, [`checkpoint`] writes and reads operator state, and [`operators`] holds the
//! incremental operators. It must not depend on the catalog, the SQL layer or the server.

pub mod change;
pub mod checkpoint;
pub mod exchange;
pub mod operator;
pub mod operators;
pub mod runtime;
pub mod watermark;

pub use change::ChangeBatch;
pub use operator::{Barrier, Message, Mutation, Operator, Output, Watermark};

/// A hash map with a fast hasher (foldhash, randomly seeded per map) for the engine's state.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
/// A hash set with the same hasher.
pub type FastSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;
