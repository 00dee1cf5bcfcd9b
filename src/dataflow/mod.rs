//! The incremental dataflow: change batches and (as the engine grows) the operator trait,
//! barriers, watermarks and the graph runtime.
//!
//! Today this module holds [`ChangeBatch`], the unit every change in freshet travels in:
//! table writes are logged and applied as change batches, and the view engine will consume
//! them. It must not depend on the catalog, the SQL layer or the server.

pub mod change;

pub use change::ChangeBatch;
